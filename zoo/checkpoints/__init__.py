"""Pretrained checkpoints: read the publishers' formats into any attention variant.

    from zoo import checkpoints, models
    model = models.create(checkpoints.describe("bigvision_vit.npz"), nnx.Rngs(0))
    report = checkpoints.load("bigvision_vit.npz", model, dont_load=("head/.*",))
    print(report.summary())

* `load(source, model, *, dont_load=(), strict=True)` -> `LoadReport` (loading.py):
  big_vision `.npz` (also the legacy ViT/AugReg layout, `:subtree`), timm/DeiT and Hugging
  Face `.safetensors`, torch `.pt/.pth/.bin` read without running code from the file, the
  adaptive-span authors' checkpoints into `TransformerSeq`, zoo workdirs, registry names.
* `describe(source)`: the zoo model config a checkpoint holds; `export(model, path,
  format="big_vision" | "timm")`: a zoo ViT in the publishers' formats.
* `catalog`: the registry of public checkpoints (URL, sha256 pin, model arguments,
  preprocessing); `download`: cached, atomic, hash-checked downloads (`$ZOO_CACHE`).
* `python -m zoo.checkpoints list | fetch NAME | inspect SOURCE | convert SOURCE OUT`.
"""

from zoo.checkpoints import adaptive_span, catalog, download, files, torch_pickle, vit
from zoo.checkpoints.exporting import describe, export
from zoo.checkpoints.files import CheckpointError
from zoo.checkpoints.loading import LoadReport, Source, load, read

__all__ = ["CheckpointError", "LoadReport", "Source", "adaptive_span", "catalog", "describe",
           "download", "export", "files", "load", "read", "torch_pickle", "vit"]
