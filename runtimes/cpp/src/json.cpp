#include "json.h"

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

namespace hita::detail {
namespace {

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  Json document() {
    Json v = value();
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  int depth_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("invalid JSON: " + why + " at offset " + std::to_string(i_));
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool consume(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }

  Json value() {
    if (++depth_ > 64) fail("nesting deeper than 64");
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.type = Json::Type::Object;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == '}') {
        ++i_;
      } else {
        for (;;) {
          skip_ws();
          if (i_ >= s_.size() || s_[i_] != '"') fail("expected a member name");
          Json key = string_token();
          skip_ws();
          if (i_ >= s_.size() || s_[i_] != ':') fail("expected ':'");
          ++i_;
          v.members.emplace_back(key.str, value());
          skip_ws();
          if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
          if (i_ < s_.size() && s_[i_] == '}') { ++i_; break; }
          fail("expected ',' or '}'");
        }
      }
    } else if (c == '[') {
      v.type = Json::Type::Array;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == ']') {
        ++i_;
      } else {
        for (;;) {
          v.items.push_back(value());
          skip_ws();
          if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
          if (i_ < s_.size() && s_[i_] == ']') { ++i_; break; }
          fail("expected ',' or ']'");
        }
      }
    } else if (c == '"') {
      v = string_token();
    } else if (consume("true")) {
      v.type = Json::Type::Bool;
      v.boolean = true;
    } else if (consume("false")) {
      v.type = Json::Type::Bool;
    } else if (consume("null")) {
      v.type = Json::Type::Null;
    } else {
      v = number_token();
    }
    --depth_;
    return v;
  }

  Json number_token() {
    // Python's json module also writes Infinity, -Infinity and NaN (e.g. an exact PSNR).
    size_t start = i_;
    Json v;
    v.type = Json::Type::Number;
    if (consume("NaN")) {
      v.number = std::nan("");
    } else if (consume("Infinity")) {
      v.number = INFINITY;
    } else if (consume("-Infinity")) {
      v.number = -INFINITY;
    } else {
      if (i_ < s_.size() && s_[i_] == '-') ++i_;
      size_t digits = i_;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      if (i_ == digits) fail("expected a value");
      if (i_ < s_.size() && s_[i_] == '.') {
        ++i_;
        while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      }
      if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
        ++i_;
        if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
        while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      }
      v.number = std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
    }
    v.raw = s_.substr(start, i_ - start);
    return v;
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }

  Json string_token() {
    size_t start = i_++;
    Json v;
    v.type = Json::Type::String;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        v.str += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': v.str += '"'; break;
        case '\\': v.str += '\\'; break;
        case '/': v.str += '/'; break;
        case 'b': v.str += '\b'; break;
        case 'f': v.str += '\f'; break;
        case 'n': v.str += '\n'; break;
        case 'r': v.str += '\r'; break;
        case 't': v.str += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(v.str, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    v.raw = s_.substr(start, i_ - start);
    return v;
  }
};

// Python's json.dumps(ensure_ascii=True) escaping of a decoded string.
std::string escape(const std::string& s) {
  static const char* hex = "0123456789abcdef";
  std::string out = "\"";
  size_t i = 0;
  auto u4 = [&](uint32_t cp) {
    out += "\\u";
    for (int sh = 12; sh >= 0; sh -= 4) out += hex[(cp >> sh) & 0xF];
  };
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    uint32_t cp = c;
    size_t len = 1;
    if (c >= 0xF0) { cp = c & 0x07; len = 4; }
    else if (c >= 0xE0) { cp = c & 0x0F; len = 3; }
    else if (c >= 0xC0) { cp = c & 0x1F; len = 2; }
    for (size_t k = 1; k < len && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    i += len;
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x10000) {  // outside the BMP: a UTF-16 surrogate pair, as Python writes it
      uint32_t v = cp - 0x10000;
      u4(0xD800 + (v >> 10));
      u4(0xDC00 + (v & 0x3FF));
      continue;
    }
    if (cp < 0x20 || cp > 0x7E) {  // Python escapes everything outside ' '..'~'
      u4(cp);
      continue;
    }
    out += static_cast<char>(cp);
  }
  return out + "\"";
}

void dump(const Json& v, std::string& out) {
  switch (v.type) {
    case Json::Type::Null: out += "null"; return;
    case Json::Type::Bool: out += v.boolean ? "true" : "false"; return;
    case Json::Type::Number: out += v.raw; return;
    case Json::Type::String: out += escape(v.str); return;
    case Json::Type::Array:
      out += '[';
      for (size_t k = 0; k < v.items.size(); ++k) {
        if (k) out += ',';
        dump(v.items[k], out);
      }
      out += ']';
      return;
    case Json::Type::Object: {
      // sort_keys: Python orders str keys by code point, which is UTF-8 byte order.
      std::vector<const std::pair<std::string, Json>*> m;
      for (const auto& kv : v.members) m.push_back(&kv);
      std::stable_sort(m.begin(), m.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t k = 0; k < m.size(); ++k) {
        if (k) out += ',';
        out += escape(m[k]->first);
        out += ':';
        dump(m[k]->second, out);
      }
      out += '}';
      return;
    }
  }
}

}  // namespace

const Json* Json::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& kv : members)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const Json& Json::at(const std::string& key, const std::string& what) const {
  const Json* v = find(key);
  if (!v) throw std::runtime_error(what + ": missing key '" + key + "'");
  return *v;
}

const std::string& Json::as_string(const std::string& what) const {
  if (type != Type::String) throw std::runtime_error(what + ": expected a string");
  return str;
}

double Json::as_number(const std::string& what) const {
  if (type != Type::Number) throw std::runtime_error(what + ": expected a number");
  return number;
}

int64_t Json::as_int(const std::string& what) const {
  double d = as_number(what);
  if (d != std::floor(d) || std::fabs(d) > 9.0e15) throw std::runtime_error(what + ": expected an integer");
  return static_cast<int64_t>(d);
}

std::string Json::canonical() const {
  std::string out;
  dump(*this, out);
  return out;
}

Json parse_json(const std::string& text) { return Parser(text).document(); }

}  // namespace hita::detail
