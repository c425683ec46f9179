"""Evaluation jobs the CLI calls: train the classifier, score a tokenizer, score generated images.

These combine layers: data sets (``hita.data``), models (``hita.checkpoint``), metrics and feature
extractors (``hita.eval``) and, for generation, any step executor (``hita.runtimes``). Reports are
JSON-able dicts, written atomically next to a small Markdown table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hita.util.files import atomic_write

__all__ = ["load_split_arrays", "train_classifier_job", "write_report"]

Log = Callable[[str], None]


def load_split_arrays(data: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """uint8 images (N, H, W) or (N, H, W, 3), int64 labels and class names of a data set split.

    Fashion-MNIST (IDX) is read in one go; an image folder is decoded file by file (``limit`` caps it).
    """
    from hita.data import open_dataset

    ds = open_dataset(data, split=split, limit=limit)
    if hasattr(ds, "images"):
        images = ds.images
    else:
        if split != "train":
            raise ValueError(f"an image folder has no {split!r} split; pass a Fashion-MNIST folder or 'fashion-mnist'")
        images = np.stack([np.asarray(ds.load(i)) for i in range(len(ds))])
    return images, np.asarray(ds.labels, dtype=np.int64), tuple(getattr(ds, "classes", range(ds.num_classes)))


def write_report(report: dict[str, Any], out: str | Path, markdown: str | None = None) -> Path:
    """``out`` (JSON) and, when given, ``out`` with ``.md`` (the human table), both atomically."""
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n"))
    if markdown is not None:
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown))
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------


def is_classifier_file(path: Path) -> bool:
    """Whether ``path`` is a classifier hita wrote (then ``train-classifier`` may replace it)."""
    from hita.eval.classifier import KIND, ClassifierError, read_metadata

    try:
        return read_metadata(path).get("hita_kind") == KIND
    except ClassifierError:
        return False


def train_classifier_job(data: str, out: str | Path, recipe=None, log: Log = print,
                         test_limit: int | None = None) -> dict[str, Any]:
    """Train the Fashion-MNIST classifier on ``data``'s train split, measure it on the test split (its
    first ``test_limit`` images, default all), and save it (weights + recipe + measured accuracy) to
    ``out``. Returns the measurement."""
    from hita.eval.classifier import ClassifierConfig, save_classifier
    from hita.eval.train_classifier import (ClassifierRecipe, accuracy, images_to_tensor, recipe_metadata,
                                            train_classifier)

    from hita.util.files import check_output_file

    check_output_file(out, "--out", owned=is_classifier_file)
    recipe = recipe or ClassifierRecipe()
    cfg = ClassifierConfig()
    tr_images, tr_labels, classes = load_split_arrays(data, "train", recipe.limit)
    te_images, te_labels, _ = load_split_arrays(data, "test", test_limit)
    if len(classes) != cfg.num_classes:
        raise ValueError(f"the data set has {len(classes)} classes; the classifier is built for {cfg.num_classes}")
    if tr_images.ndim == 4:
        tr_images, te_images = tr_images.mean(-1).astype(np.uint8), te_images.mean(-1).astype(np.uint8)
    log(f"training the classifier on {len(tr_images)} images ({recipe.epochs:g} epochs)")
    model = train_classifier(images_to_tensor(tr_images, cfg.image_size), torch.from_numpy(tr_labels), recipe, cfg, log)
    acc, per = accuracy(model, images_to_tensor(te_images, cfg.image_size), torch.from_numpy(te_labels))
    save_classifier(model, out, recipe_metadata(recipe, acc, per))
    log(f"test accuracy {acc:.4f} on {len(te_images)} images -> {out}")
    return {"test_accuracy": acc, "per_class": dict(zip(classes, per.tolist())), "path": str(out)}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def evaluate_tokenizer_job(tokenizer: str | Path, data: str, split: str = "test", limit: int | None = None,
                           batch_size: int = 250, backbone: str | Path | None = None,
                           progress: bool = True):
    """Codebook usage, PSNR / SSIM and holistic influence of a tokenizer checkpoint over a data split."""
    from tqdm import tqdm

    from hita.checkpoint import load_tokenizer
    from hita.data import open_dataset
    from hita.eval.tokenizer_eval import dataset_batches, evaluate_tokenizer

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size})")
    ds = open_dataset(data, split=split, limit=limit)
    tok = load_tokenizer(tokenizer, backbone=backbone)
    n = len(ds)
    bar = tqdm(total=n, desc="tokenizer", unit="img", disable=not progress)
    last = [0]

    def tick(done: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    report = evaluate_tokenizer(tok, dataset_batches(ds, tok.cfg.image_size, batch_size), tick)
    bar.close()
    return report


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def balanced_classes(num_classes: int, per_class: int) -> list[int]:
    """Class ids ``0, 1, ..., K-1, 0, 1, ...``: every shard holds every class in equal measure."""
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1 (got {per_class})")
    return [i % num_classes for i in range(num_classes * per_class)]


def real_features(extractor, data: str, split: str, size: int, limit: int | None = None, batch_size: int = 1000):
    """Features and labels of real images of a data split, brought to the generated images' size."""
    from hita.data import open_dataset
    from hita.eval.features import extract
    from hita.eval.tokenizer_eval import dataset_batches

    ds = open_dataset(data, split=split, limit=limit)
    images = np.concatenate(list(dataset_batches(ds, size, batch_size)))
    return extract(extractor, images), np.asarray(ds.labels[: len(images)], dtype=np.int64)


def reference_from_npz(path: str | Path, extractor, size: int):
    """An ADM-style reference batch: ``arr_0`` uint8 images (N, H, W, 3), and/or ``mu`` / ``sigma``.

    Images are scored with ``extractor`` (so any feature space works, and precision / recall can be
    computed); without images, the stored statistics are used as they are, which only makes sense in
    the space they were computed in (Inception pool3, 2048 wide).

    Returns:
        (GaussianStats, features or None).
    """
    from hita.eval.features import extract
    from hita.eval.metrics import GaussianStats

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--reference {path}: no such file; pass an ADM-style .npz (arr_0 images and/or mu, sigma) "
                         "or 'fashion-mnist'")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--reference {path}: not a readable .npz ({e}); pass an ADM-style reference batch") from None
    with z:
        if "arr_0" in z.files:
            images = z["arr_0"]
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(f"--reference {path}: arr_0 is {images.dtype} {images.shape}, not uint8 images "
                                 "(N, H, W, 3); pass an ADM-style reference batch")
            if images.shape[1:3] != (size, size):
                raise ValueError(f"--reference {path}: holds {images.shape[1]}x{images.shape[2]} images but the generated "
                                 f"images are {size}x{size}; pass --resize {images.shape[1]} or a {size}x{size} "
                                 "reference batch")
            feats = extract(extractor, images).features
            return GaussianStats.of(feats), feats
        if "mu" in z.files and "sigma" in z.files:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            if mu.shape != (extractor.feature_dim,) or sigma.shape != (extractor.feature_dim,) * 2:
                raise ValueError(f"--reference {path}: statistics are {mu.shape[0]}-wide but the {extractor.name} "
                                 f"features are {extractor.feature_dim}-wide; use --features inception with an ADM "
                                 "batch, or a reference with images (arr_0)")
            return GaussianStats(mu, sigma, 0), None
    raise ValueError(f"--reference {path}: has neither arr_0 (images) nor mu and sigma; pass an ADM-style reference batch")


def generate_shards(executor, extractor, opts, store, class_ids: list[int], shard_size: int, batch_size: int,
                    resize: int | None, progress: bool = True, keep_images_max_side: int = 64):
    """Generate and score every missing shard of ``store``; return all shards' arrays concatenated.

    Image ``i`` is class ``class_ids[i]`` and draws noise row ``i``, so shards, batches and resumes
    never change an image. Small images (side <= ``keep_images_max_side``) are kept in the shards too.
    """
    from tqdm import tqdm

    from hita.runtimes.loop import generate_images, to_uint8

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard-size and --batch-size must be at least 1 (got {shard_size}, {batch_size})")
    n = len(class_ids)
    n_shards = -(-n // shard_size)
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=n, desc=f"generate+score ({executor.name})", unit="img", disable=not progress)
    for s in range(n_shards):
        a, b = s * shard_size, min(n, (s + 1) * shard_size)
        shard = store.load(s)
        if shard is not None and len(shard.get("class_ids", ())) == b - a:
            parts.append(shard)
            bar.update(b - a)
            continue
        images = []
        for c in range(a, b, batch_size):
            ids = torch.tensor(class_ids[c:min(b, c + batch_size)], dtype=torch.long)
            imgs, _ = generate_images(executor, ids, opts, row_offset=c)
            images.append(to_uint8(imgs, size=resize).numpy())
            bar.update(len(ids))
        u8 = np.concatenate(images)
        f = extractor(u8)
        shard = {"class_ids": np.asarray(class_ids[a:b], dtype=np.int64), "features": f.features}
        if f.logits is not None:
            shard["logits"] = f.logits
        if u8.shape[1] <= keep_images_max_side:
            shard["images"] = u8
        store.save(s, shard)
        parts.append(shard)
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def score(features: np.ndarray, logits: np.ndarray | None, ref_stats, ref_features: np.ndarray | None,
          wanted: np.ndarray | None, num_classes: int | None, pr_k: int = 3, is_splits: int = 10) -> dict[str, Any]:
    """FID against the reference, IS, precision / recall (when reference features exist), class accuracy
    (when the logits are the generator's classes and ``wanted`` is given)."""
    from hita.eval.metrics import GaussianStats, class_accuracy, frechet_distance, inception_score, precision_recall

    out: dict[str, Any] = {"images": int(len(features)),
                           "fid": frechet_distance(GaussianStats.of(features), ref_stats)}
    if logits is not None:
        out["is"], out["is_std"] = inception_score(_softmax(logits.astype(np.float64)), min(is_splits, len(logits)))
    if ref_features is not None:
        out["precision"], out["recall"] = precision_recall(ref_features, features, pr_k)
    if wanted is not None and logits is not None and num_classes is not None:
        acc, per = class_accuracy(logits.argmax(1), wanted, num_classes)
        out["class_accuracy"], out["class_accuracy_per_class"] = acc, per.tolist()
    return out


def build_extractor(kind: str, classifier: str | Path | None = None, inception_weights: str | Path | None = None):
    """``classifier`` (the shipped Fashion-MNIST classifier, or ``classifier``) or ``inception`` (local weights)."""
    if kind == "classifier":
        from hita.eval.classifier import load_classifier, shipped_classifier
        from hita.eval.features import ClassifierFeatures

        return ClassifierFeatures(load_classifier(classifier or shipped_classifier()))
    if kind == "inception":
        from hita.eval.inception import InceptionFeatures

        return InceptionFeatures.from_file(inception_weights)
    raise ValueError(f"unknown feature space {kind!r}; valid: classifier, inception")


def evaluate_generation_job(executor, extractor, opts, out: str | Path, *, per_class: int, reference: str = "fashion-mnist",
                            floor: bool = True, shard_size: int = 500, batch_size: int = 100, resize: int | None = None,
                            restart: bool = False, model_id: dict[str, Any] | None = None,
                            class_names: tuple[str, ...] | None = None, progress: bool = True,
                            log: Log = print) -> dict[str, Any]:
    """Generate ``per_class`` images of every class through ``executor`` (sharded, resumable), score
    them in ``extractor``'s space against ``reference``, and write ``report.json`` / ``report.md`` /
    ``grid.png`` into ``out``.

    ``reference`` is a data set spec (its test split; ``floor`` then also scores as many real training
    images the same way: the best a generator can do) or an ADM-style ``.npz``.
    """
    import dataclasses
    import time

    from hita.eval.metrics import GaussianStats
    from hita.eval.shards import ShardStore

    cfg = executor.gpt_config
    size = resize or (executor.tokenizer_config.image_size if executor.tokenizer_config else None)
    if size is None:
        raise ValueError(f"{executor.name} has no tokenizer decoder; evaluate artifacts exported with the decoder")
    ids = balanced_classes(cfg.num_classes, per_class)
    is_data = not str(reference).endswith(".npz")
    start = time.perf_counter()
    # The reference is checked (and scored) before any image is generated: a wrong one fails in seconds.
    if is_data:
        ref, ref_labels = real_features(extractor, reference, "test", size)
        ref_stats, ref_feats = GaussianStats.of(ref.features), ref.features
    else:
        ref_stats, ref_feats = reference_from_npz(reference, extractor, size)
        ref, ref_labels = None, None
    spec = {"version": 1, "runtime": executor.name, "model": model_id or {}, "options": dataclasses.asdict(opts),
            "num_classes": cfg.num_classes, "per_class": per_class, "shard_size": shard_size, "resize": resize,
            "features": extractor.name}
    from hita.util.files import claim_folder

    claim_folder(out, "evaluate-generation")  # never writes into a folder of someone else's files
    store = ShardStore(out, spec, restart=restart)
    gen = generate_shards(executor, extractor, opts, store, ids, shard_size, batch_size, resize, progress)
    wanted = gen["class_ids"] if extractor.class_logits else None
    k = cfg.num_classes if extractor.class_logits else None
    report: dict[str, Any] = {"spec": spec, "reference": str(reference),
                              "generated": score(gen["features"], gen.get("logits"), ref_stats, ref_feats, wanted, k)}
    if is_data and ref is not None:
        report["real_test"] = score(ref.features, ref.logits, ref_stats, None,
                                    ref_labels if extractor.class_logits else None, k)
        del report["real_test"]["fid"]  # zero by construction
        if floor:
            tr, tr_labels = real_features(extractor, reference, "train", size, limit=len(ids))
            report["real_train_floor"] = score(tr.features, tr.logits, ref_stats, ref_feats,
                                               tr_labels if extractor.class_logits else None, k)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if "images" in gen:
        from hita.util.images import save_grid

        n_show = min(len(ids), cfg.num_classes * min(per_class, 10))
        order = sorted(range(n_show), key=lambda i: (ids[i], i))  # one row per class
        names = class_names or tuple(str(c) for c in range(cfg.num_classes))
        save_grid(gen["images"][order], Path(out) / "grid.png", nrow=min(per_class, 10),
                  labels=[names[ids[i]] if ids[i] < len(names) else str(ids[i]) for i in order])
    write_report(report, Path(out) / "report.json", generation_markdown(report, class_names))
    return report


def _fmt(d: dict[str, Any], key: str, spec: str = ".3f") -> str:
    v = d.get(key)
    return "—" if v is None else format(v, spec)


def generation_markdown(report: dict[str, Any], class_names: tuple[str, ...] | None = None) -> str:
    """The report as Markdown: one row per image set, then per-class accuracy."""
    spec = report["spec"]
    o = spec["options"]
    rows = [f"Feature space: `{spec['features']}`; reference: `{report['reference']}` (test split); "
            f"runtime `{spec['runtime']}`, cfg {o['cfg_scale']:g}, temperature {o['temperature']:g}, "
            f"top-k {o['top_k']}, seed {o['seed']}.\n",
            "| images | n | FID ↓ | IS ↑ | precision ↑ | recall ↑ | class accuracy ↑ |", "|---|---|---|---|---|---|---|"]
    for key, title in (("generated", "generated"), ("real_train_floor", "real train (floor)"),
                       ("real_test", "real test (reference)")):
        d = report.get(key)
        if d is None:
            continue
        is_ = "—" if d.get("is") is None else f"{d['is']:.2f} ± {d['is_std']:.2f}"
        acc = "—" if d.get("class_accuracy") is None else f"{100 * d['class_accuracy']:.1f} %"
        rows.append(f"| {title} | {d['images']} | {_fmt(d, 'fid', '.2f')} | {is_} | {_fmt(d, 'precision')} | "
                    f"{_fmt(d, 'recall')} | {acc} |")
    per = report["generated"].get("class_accuracy_per_class")
    if per is not None:
        real = report.get("real_test", {}).get("class_accuracy_per_class")
        names = class_names or tuple(str(c) for c in range(len(per)))
        rows += ["", "| class | generated classified as it | classifier on real test images |", "|---|---|---|"]
        for c, a in enumerate(per):
            r = "—" if real is None else f"{100 * real[c]:.1f} %"
            rows.append(f"| {names[c] if c < len(names) else c} | {100 * a:.1f} % | {r} |")
    return "\n".join(rows) + "\n"
