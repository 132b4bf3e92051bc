"""Patch-based 3D medical image segmentation with fastai, TorchIO and MONAI

Modules:

- `patchfm.config`: Every patch-related setting in one validated, immutable, JSON-serialisable object, and the preprocessing pipeline it implies.
- `patchfm.core`: `MedImage` / `MedMask`, reading and writing through TorchIO, reorientation, resampling, and putting a prediction back onto the original image grid through the affine.
- `patchfm.metrics`: `AccumulatedDice` for training, per-case DSC, HD95 (mm), confusion metrics, lesion detection and volume error, and an evaluation table straight from prediction and ground-truth files.
- `patchfm.models`: `UNet`, `HyperUNet` (every weight generated from the patch size), baking a plain U-Net for one patch size, and the calling protocol that training and inference use for size-conditioned models.
- `patchfm.performance`: Spatially resolved performance maps of patch predictions, a fastai callback that records them, and an overlap recommendation for sliding-window inference derived from them."""

__version__ = "0.1.0"
