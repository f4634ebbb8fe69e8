"""Training data: the image_dataset artifact, image transforms, and the latent/text-embedding cache.

Transforms use PIL and numpy (torchvision is not installable beside our torch): resize the
shorter side to the resolution (bilinear, as diffusers' examples), then a center crop or a
random crop whose offset is drawn once per image from the seed — so the crop is a property of
the (dataset, seed) pair and can be cached.

**Random flip, exactly.**  A horizontally flipped image does not encode to a flipped latent
(the VAE is not equivariant to flips), so flipping latents would train on latents no image
has.  The cache therefore stores the VAE posterior of *both* orientations of every image
(orientation 0 = as is, 1 = mirrored) and the trainer picks one per sample and epoch.  SDXL's
crop-coordinate time ids are stored per orientation too (the mirrored crop starts at
``width - left - resolution``).

**Cache contents.**  The VAE posterior's mean and std (not a sample): the trainer draws
``mean + std * ε`` with its own seeded generator every step, which is the same distribution as
encoding the image every step (the diffusers example's ``latent_dist.sample()``), so caching
changes speed, not the training objective.  Text embeddings are the pipeline's own
``encode_prompt`` output (SDXL: both encoders' penultimate states and the pooled projection).
The cache is keyed by (dataset digest, base model, resolution, crop mode, flip, seed, format
version) and published as a ``latent_cache`` artifact, so every re-run and resume reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest, new_artifact_id
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma_training.config import TrainingConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: keyed by the encoding weights' digest (model_fingerprint), not only the model's name
CACHE_FILE = "cache.safetensors"
CACHE_META = "cache.json"


@dataclass
class Example:
    """One image-caption pair of the dataset."""

    file_name: str
    text: str


def load_dataset(store: ArtifactStore, dataset_id: str, *, field: str = "spec.dataset") -> tuple[Manifest, list[Example]]:
    """The dataset manifest and its examples; NotFound / InvalidArgument naming ``field``."""
    try:
        manifest = store.get(dataset_id)
    except NotFound:
        raise NotFound(f"dataset artifact {dataset_id!r} does not exist; render a dataset first", field=field) from None
    except InvalidArgument:
        raise InvalidArgument(f"{dataset_id!r} is not an artifact id", field=f"{field}.id") from None
    if manifest.kind != ArtifactKind.IMAGE_DATASET:
        raise InvalidArgument(f"artifact {dataset_id} is a {manifest.kind.value}, not an image_dataset", field=field)
    try:
        raw = store.read_bytes(manifest, "metadata.jsonl")
    except NotFound:
        raise InvalidArgument(f"dataset {dataset_id} has no metadata.jsonl, so no captions", field=field) from None
    examples: list[Example] = []
    paths = {f.path for f in manifest.files}
    for n, line in enumerate(raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidArgument(f"dataset {dataset_id}: metadata.jsonl line {n} is not JSON", field=field) from None
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f"dataset {dataset_id}: image on metadata.jsonl line {n} has no caption ('text')", field=field)
        name = row.get("file_name", "")
        if name not in paths:
            raise InvalidArgument(f"dataset {dataset_id}: line {n} names {name!r}, which the artifact does not hold", field=field)
        examples.append(Example(file_name=name, text=text))
    if not examples:
        raise InvalidArgument(f"dataset {dataset_id} has no captioned images", field=field)
    return manifest, examples


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) example indices, each ascending: ``round(fraction × n)`` images (at
    least one) held out, chosen by a permutation drawn from the seed alone, so the split is the same
    on every attempt and every machine.  ``fraction`` 0 = no split.  FailedPrecondition naming the
    field when the dataset is too small to keep an image on both sides."""
    if fraction <= 0:
        return list(range(n)), []
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise FailedPrecondition(f"the dataset has {n} image(s): holding out {k} for validation leaves none to train on; "
                                 "use a larger dataset or turn early stopping off (validation_fraction 0)",
                                 field="config.early_stopping.validation_fraction")
    perm = np.random.default_rng([seed, 0x5E1EC7]).permutation(n)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])


def crop_offset(seed: int, index: int, slack_x: int, slack_y: int, center: bool) -> tuple[int, int]:
    """(left, top) of the crop of image ``index``: centered, or random but fixed by (seed, index)."""
    if center:
        return slack_x // 2, slack_y // 2
    rng = np.random.default_rng([seed, index, 7])
    return int(rng.integers(0, slack_x + 1)), int(rng.integers(0, slack_y + 1))


def preprocess(data: bytes, resolution: int, *, seed: int, index: int, center: bool) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], int]:
    """Decode, resize the shorter side to ``resolution``, crop; returns (HWC float32 in [-1, 1],
    original (h, w), crop (top, left), resized width)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = crop_offset(seed, index, nw - resolution, nh - resolution, center)
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return arr, (h, w), (top, left), nw


def to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def model_fingerprint(pipe: Any) -> str:
    """The pipeline class and a sha256 of the weights the cache's tensors come from.

    Those are the autoencoder's encoder (with ``quant_conv``: the posterior's mean and std) and the
    text encoder(s).  A model reference names weights only loosely (a local directory retrained in
    place, a mutable hub branch, a fixed autoencoder), so the cache is keyed by what encoded it:
    the same images under other weights are encoded afresh, never read from a stale cache.
    """
    h = hashlib.sha256(type(pipe).__name__.encode())
    parts = [("vae.encoder", getattr(pipe.vae, "encoder", None)), ("vae.quant_conv", getattr(pipe.vae, "quant_conv", None)),
             ("text_encoder", getattr(pipe, "text_encoder", None)), ("text_encoder_2", getattr(pipe, "text_encoder_2", None))]
    for name, module in parts:
        if module is None:
            continue
        for key, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(dataset: Manifest, config: TrainingConfig, model_fingerprint: str) -> str:
    """The digest the cache artifact is keyed by."""
    doc = {
        "format": CACHE_FORMAT,
        "dataset": dataset.digest,
        "model": config.base_model.model_dump(),
        "model_fingerprint": model_fingerprint,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "random_flip": config.random_flip,
        "seed": config.seed if not config.center_crop else 0,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_id_for(key: str) -> str:
    return new_artifact_id(ArtifactKind.LATENT_CACHE, key)


class SampleSource:
    """Latents and conditioning for training samples, from the cache or by encoding each time.

    ``latent_dist(indices, orientations)`` → (mean, std); ``conditioning(indices, orientations)``
    → dict with ``prompt_embeds`` and, for SDXL, ``pooled`` and ``time_ids``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def latent_dist(self, idx: torch.Tensor, orient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t["latent_mean"][idx, orient], self.t["latent_std"][idx, orient]

    def conditioning(self, idx: torch.Tensor, orient: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.t["prompt_embeds"][idx]}
        if "pooled" in self.t:
            out["pooled"] = self.t["pooled"][idx]
            out["time_ids"] = self.t["time_ids"][idx, orient]
        return out


class Encoder:
    """Runs the pipeline's VAE and text encoder(s) on examples (cache build, or the no-cache loop)."""

    def __init__(self, pipe: Any, store: ArtifactStore, dataset: Manifest, examples: list[Example], config: TrainingConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe, self.store, self.dataset, self.examples = pipe, store, dataset, examples
        self.config, self.device, self.dtype = config, device, dtype
        self.is_xl = hasattr(pipe, "text_encoder_2")
        self._bytes: dict[int, bytes] = {}

    def _image(self, i: int) -> bytes:
        if i not in self._bytes:
            self._bytes[i] = self.store.read_bytes(self.dataset, self.examples[i].file_name)
        return self._bytes[i]

    @torch.no_grad()
    def encode_images(self, indices: list[int], orientations: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) and SDXL time ids for each (index, orientation)."""
        c = self.config
        arrays, time_ids = [], []
        for i, o in zip(indices, orientations, strict=True):
            arr, (oh, ow), (top, left), nw = preprocess(self._image(i), c.resolution, seed=c.seed, index=i, center=c.center_crop)
            if o:
                arr = arr[:, ::-1, :]
                left = nw - left - c.resolution
            arrays.append(np.ascontiguousarray(arr))
            time_ids.append([oh, ow, top, left, c.resolution, c.resolution])
        px = to_tensor(arrays).to(self.device, self.dtype)
        dist = self.pipe.vae.encode(px).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu(), torch.tensor(time_ids, dtype=torch.float32)

    @torch.no_grad()
    def encode_text(self, indices: list[int]) -> dict[str, torch.Tensor]:
        prompts = [self.examples[i].text for i in indices]
        if self.is_xl:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return {"prompt_embeds": emb.float().cpu(), "pooled": pooled.float().cpu()}
        emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": emb.float().cpu()}

    def build_all(self, batch_size: int, on_progress: Any = None) -> dict[str, torch.Tensor]:
        """Encode every example in both orientations (one if flips are off): the cache tensors."""
        n = len(self.examples)
        orients = [0, 1] if self.config.random_flip else [0]
        means, stds, tids, texts = [], [], [], []
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            per_o = [self.encode_images(idx, [o] * len(idx)) for o in orients]
            means.append(torch.stack([p[0] for p in per_o], 1))
            stds.append(torch.stack([p[1] for p in per_o], 1))
            tids.append(torch.stack([p[2] for p in per_o], 1))
            texts.append(self.encode_text(idx))
            if on_progress:
                on_progress(min(n, start + batch_size), n)
        out = {
            "latent_mean": torch.cat(means).contiguous(),
            "latent_std": torch.cat(stds).contiguous(),
            "prompt_embeds": torch.cat([t["prompt_embeds"] for t in texts]).contiguous(),
        }
        if self.is_xl:
            out["pooled"] = torch.cat([t["pooled"] for t in texts]).contiguous()
            out["time_ids"] = torch.cat(tids).contiguous()
        return out


class LiveSource(SampleSource):
    """The no-cache path: decode, transform and encode each batch when it is drawn."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__({})
        self.enc = encoder

    def latent_dist(self, idx: torch.Tensor, orient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, self._tids = self.enc.encode_images(idx.tolist(), orient.tolist())
        return mean, std

    def conditioning(self, idx: torch.Tensor, orient: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.enc.encode_text(idx.tolist())
        if self.enc.is_xl:
            out["time_ids"] = self._tids
        return out


def save_cache(store: ArtifactStore, cache_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, parents: list[str], labels: dict[str, str]) -> Manifest:
    """Publish the cache tensors as a latent_cache artifact."""
    from safetensors.torch import save

    with store.writer(ArtifactKind.LATENT_CACHE, id=cache_id, parents=parents, parameters=meta, labels=labels, name="latent cache") as w:
        w.put_bytes(CACHE_FILE, save(tensors))
        w.put_bytes(CACHE_META, json.dumps(meta, indent=2, sort_keys=True).encode())
    return store.get(cache_id)


def load_cache(store: ArtifactStore, manifest: Manifest, n_examples: int) -> dict[str, torch.Tensor]:
    """The cache tensors (sha256-verified); FailedPrecondition if they do not match the dataset."""
    from safetensors.torch import load

    tensors = load(store.read_bytes(manifest, CACHE_FILE))
    if tensors["latent_mean"].shape[0] != n_examples:
        raise FailedPrecondition(f"latent cache {manifest.id} holds {tensors['latent_mean'].shape[0]} examples, the dataset {n_examples}")
    return tensors
