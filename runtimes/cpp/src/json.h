// A small JSON reader for manifest.json (internal to the host; no dependency outside the C++17
// standard library). It keeps the source text of every number and string so that the manifest's
// content checksum can be recomputed exactly as Python's
// json.dumps(body, sort_keys=True, separators=(",", ":")) writes it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace hita::detail {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string str;  // decoded value of a string
  std::string raw;  // source text of a number or string token (quotes and escapes included)
  std::vector<Json> items;                            // array elements
  std::vector<std::pair<std::string, Json>> members;  // object members, file order

  bool is_object() const { return type == Type::Object; }
  bool is_array() const { return type == Type::Array; }
  bool is_string() const { return type == Type::String; }
  bool is_number() const { return type == Type::Number; }

  // Member lookup; nullptr when absent or when this is not an object.
  const Json* find(const std::string& key) const;
  // Typed accessors; throw std::runtime_error naming `what` on a type mismatch or missing key.
  const Json& at(const std::string& key, const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;

  // Python's json.dumps(self, sort_keys=True, separators=(",", ":")) for a value that Python
  // wrote (numbers and strings are re-emitted from their source text).
  std::string canonical() const;
};

// Parses a whole document; throws std::runtime_error("... at offset N") on malformed input.
Json parse_json(const std::string& text);

}  // namespace hita::detail
