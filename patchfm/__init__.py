"""Patch-based 3D medical image segmentation with fastai, TorchIO and MONAI

Modules:

- `patchfm.config`: Every patch-related setting in one validated, immutable, JSON-serialisable object, and the preprocessing pipeline it implies.
- `patchfm.core`: `MedImage` / `MedMask`, reading and writing through TorchIO, reorientation, resampling, and putting a prediction back onto the original image grid through the affine.
- `patchfm.data`: `PatchDataLoader` and `MedPatchDataLoaders`: real fastai `DataLoaders` that feed random 3D patches to a `Learner`, drawn from a background-refilled shuffle buffer.
- `patchfm.dataset`: `MedDataset` reads the headers (or, for masks, the voxels) of a set of medical images in parallel and turns them into the numbers a patch-based pipeline is configured from: a target spacing, size statistics after resampling, and a patch size.
- `patchfm.inference`: `patch_inference(learner, config, file_paths)`: read, preprocess exactly as in training, predict patch by patch, blend on the model's device, and write NIfTI on the original grid.
- `patchfm.learner`: `patch_learner` (a fastai `Learner` with patch-segmentation defaults in one call), `PatchLearner` (the `Learner` it returns: it records its fit calls and tells callbacks when a fit raises), `default_unet` and `SlidingWindowDice`, the full-volume validation metric that predicts with the inference engine.
- `patchfm.metrics`: `AccumulatedDice` for training, per-case DSC, HD95 (mm), confusion metrics, lesion detection and volume error, and an evaluation table straight from prediction and ground-truth files.
- `patchfm.mlflow_ui`: Where MLflow runs are stored (one per-user SQLite store unless told otherwise) and `MLflowUIManager`, which starts, checks and stops an MLflow UI server on that store and nothing else.
- `patchfm.models`: `UNet`, `HyperUNet` (every weight generated from the patch size), baking a plain U-Net for one patch size, and the calling protocol that training and inference use for size-conditioned models.
- `patchfm.patchsize`: Train networks that keep working when the inference patch size changes (patch-size augmentation and the size-conditioned `HyperUNet`), and measure Dice as a function of the patch size.
- `patchfm.performance`: Spatially resolved performance maps of patch predictions, a fastai callback that records them, and an overlap recommendation for sliding-window inference derived from them.
- `patchfm.preprocess`: The one preprocessing of a subject (read, reorient, resample, intensity transforms, pad) that the patch loaders, `patch_inference` and `SlidingWindowDice` share, and the optional cache of preprocessed volumes.
- `patchfm.regrid`: Resampling a prediction from the preprocessed frame onto the grid of the file the user gave, through the affines (exact and separable for reorientation plus resampling).
- `patchfm.runtime`: `cpu_heap_cache()` and `HeapCacheCallback`: on CPU, stop every forward pass from paying the kernel to map and zero its activations again.
- `patchfm.sampling`: Where the patches of a volume lie: valid centres, tiles that cover a volume, the samplers (uniform, label, weighted) as small objects, and the seeds every random choice of the loaders derives from.
- `patchfm.serialisation`: `save_model` / `load_model`: weights as safetensors plus the PatchConfig, the preprocessing and the model description as JSON, so a trained model can be deployed without unpickling anything.
- `patchfm.stream`: The worker side of the patch loaders: `PatchSource` (key -> the patches of one subject), the keys of each epoch and their shards, shared-memory slots and batch memory, and `PatchStream` (the worker processes and the shuffle buffer a `PatchDataLoader` draws its batches from).
- `patchfm.subjects`: The subjects of a split as paths (no voxel is read until a worker visits them), the checks made from their headers, the number of validation tiles and the train/validation split.
- `patchfm.topk`: Learn which few full-resolution patches are worth a forward pass: a low-resolution global network scores every candidate patch, a differentiable Gumbel top-k picks K of them, a local network segments only those, and the global prediction fills the rest of the volume ("No More Sliding Window", arXiv 2501.10814).
- `patchfm.tracking`: A fastai callback that logs a fit to MLflow (parameters read from the learner, per-epoch metrics, the PatchConfig, the data split, a loss curve and pickle-free weights) and reloading a model from a run.
- `patchfm.volumes`: `volume_dataloaders`: fastai DataLoaders of whole preprocessed (image, label) volumes, the input of `patchfm.topk.topk_learner` (its global branch sees the whole volume)."""

__version__ = "0.1.0"
