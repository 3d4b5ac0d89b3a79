"""`diffuse data report`: what a prepared dataset covers, and how any prompt relates to it.

The model can only interpolate between what its data shows. This report makes that visible (vocabulary,
n-grams, concepts, attribute balance, near-duplicate clusters, spread and clusters of the caption embeddings,
a contact sheet) and `CoverageIndex` scores a prompt by its similarity to the nearest training captions, so
batch generation can flag prompts outside the data's span before spending compute on them.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from pipeline.config import ContextConfig, CoverageConfig, ReportConfig
from pipeline.data.prepared import PreparedDataset, open_prepared
from pipeline.errors import UserError
from pipeline.model.encoders import build_encoder

INDEX_FILE = "coverage_index.safetensors"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _text_encoder(ctx: ContextConfig):
    if ctx.encoder == "category":
        raise UserError("coverage and caption embeddings need a text encoder (context.encoder minilm or clip)")
    return build_encoder(ctx.encoder, ctx.max_length, ctx.clip_path)


# ---------------------------------------------------------------- coverage


@dataclass
class Coverage:
    prompt: str
    score: float  # cosine similarity to the nearest training caption, in the training encoder's pooled space
    in_span: bool
    nearest: list[tuple[str, float]]


class CoverageIndex:
    """Pooled, L2-normalised embeddings of a dataset's unique captions (cached in the dataset folder)."""

    def __init__(self, captions: list[str], vectors: torch.Tensor, encoder, threshold: float):
        self.captions, self.vectors, self.encoder, self.threshold = captions, vectors, encoder, threshold

    @classmethod
    def build(cls, ds: PreparedDataset, ctx: ContextConfig | None = None, cfg: CoverageConfig | None = None):
        ctx, cfg = ctx or ContextConfig(), cfg or CoverageConfig()
        encoder = _text_encoder(ctx)
        captions = sorted(set(ds.captions))
        file = ds.path / INDEX_FILE
        meta_file = file.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if meta.get("encoder_id") == encoder.id and meta.get("dataset_version") == ds.version:
            vectors = load_file(file)["vectors"]
        else:
            vectors = cls._embed(encoder, captions)
            save_file({"vectors": vectors.contiguous()}, file)
            meta_file.write_text(json.dumps({"encoder_id": encoder.id, "dataset_version": ds.version}))
        return cls(captions, vectors, encoder, cfg.threshold)

    @staticmethod
    def _embed(encoder, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            pooled = encoder.encode(texts).pooled.float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    def score(self, prompts: list[str], k: int = 3) -> list[Coverage]:
        sims = self._embed(self.encoder, prompts) @ self.vectors.T
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        out = []
        for p, vals, idx in zip(prompts, top.values.tolist(), top.indices.tolist(), strict=True):
            out.append(Coverage(p, vals[0], vals[0] >= self.threshold,
                                [(self.captions[i], round(v, 4)) for i, v in zip(idx, vals, strict=True)]))
        return out


def coverage(prompts: list[str], dataset: str | Path, ctx: ContextConfig | None = None,
             cfg: CoverageConfig | None = None, k: int = 3) -> list[Coverage]:
    """For each prompt: its nearest training captions and a coverage score (flagged when below the threshold)."""
    return CoverageIndex.build(open_prepared(dataset), ctx, cfg).score(prompts, k)


# ---------------------------------------------------------------- report


def caption_statistics(captions: list[str], top_k: int) -> dict:
    tokens = [_words(c) for c in captions]
    vocab = Counter(w for ws in tokens for w in ws)
    lengths = np.array([len(ws) for ws in tokens])
    concepts = Counter({w: n for w, n in vocab.items() if w not in ENGLISH_STOP_WORDS and not w.isdigit()})
    ngrams = {}
    for n in (2, 3):
        vec = CountVectorizer(ngram_range=(n, n), token_pattern=r"[a-z0-9]+(?:'[a-z]+)?", lowercase=True)
        try:
            counts = vec.fit_transform(captions).sum(axis=0).A1
            order = np.argsort(-counts, kind="stable")[:top_k]
            names = vec.get_feature_names_out()
            ngrams[f"{n}-grams"] = [(names[i], int(counts[i])) for i in order]
        except ValueError:  # no n-grams of that length
            ngrams[f"{n}-grams"] = []
    return {
        "num_captions": len(captions), "unique_captions": len(set(captions)), "vocabulary_size": len(vocab),
        "words_per_caption": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        "top_words": vocab.most_common(top_k), "top_concepts": concepts.most_common(top_k), **ngrams,
    }


def attribute_balance(captions: list[str], attributes: dict[str, list[str]]) -> dict:
    """Per attribute (e.g. colour: [red, green, ...]): how often each value appears, and a balance score
    (normalised entropy: 1 = all values equally common, 0 = one value only)."""
    out = {}
    tokens = [set(_words(c)) for c in captions]
    for attr, values in attributes.items():
        counts = {v: sum(v.lower() in ws for ws in tokens) for v in values}
        total = sum(counts.values())
        probs = [n / total for n in counts.values() if n] if total else []
        entropy = -sum(p * math.log(p) for p in probs)
        out[attr] = {"counts": counts, "missing": [v for v, n in counts.items() if n == 0],
                     "balance": entropy / math.log(len(values)) if len(values) > 1 and total else 0.0,
                     "captions_without": sum(not (ws & {v.lower() for v in values}) for ws in tokens)}
    return out


def embedding_spread(index: CoverageIndex, clusters: int, seed: int = 0) -> dict:
    """How spread the captions are in the encoder's space, and the main clusters with examples."""
    x = index.vectors.numpy()
    centroid = x.mean(0)
    dist = 1 - x @ (centroid / max(np.linalg.norm(centroid), 1e-8))
    k = min(clusters, len(x))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    groups = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        closest = members[np.argsort(np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1))[:3]]
        groups.append({"size": int(len(members)), "examples": [index.captions[i] for i in closest]})
    groups.sort(key=lambda g: -g["size"])
    return {"mean_cosine_distance_to_centroid": float(dist.mean()), "max_cosine_distance_to_centroid":
            float(dist.max()), "clusters": groups}


def near_duplicate_clusters(ds: PreparedDataset, top_k: int) -> dict:
    m = ds.manifest
    flagged = m.dropna(subset=["near_duplicate_of"])
    sizes = flagged.groupby("near_duplicate_of").size().sort_values(ascending=False, kind="stable")
    id_to_caption = dict(zip(m["id"], m["caption"], strict=True))
    quarantined = [q for q in ds.quarantine() if q.get("kind") == "near_duplicate"]
    return {"flagged_items": int(len(flagged)), "quarantined_items": len(quarantined),
            "largest_clusters": [{"id": i, "caption": id_to_caption.get(i), "copies": int(n)}
                                 for i, n in sizes.head(top_k).items()]}


def contact_sheet(ds: PreparedDataset, out: Path, count: int, seed: int = 0) -> Path:
    """`count` random images in cells of R x R; a bucketed dataset's images whole, shrunk to fit and centred."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), size=min(count, len(ds)), replace=False))
    cols = math.ceil(math.sqrt(len(rows)))
    r = ds.resolution
    sheet = Image.new("RGB", (cols * r, math.ceil(len(rows) / cols) * r), "white")
    for at, imgs in ds.by_size(rows):
        for i, img in zip(at.tolist(), imgs, strict=True):
            cell = Image.fromarray(img)
            cell.thumbnail((r, r))
            sheet.paste(cell, ((i % cols) * r + (r - cell.width) // 2, (i // cols) * r + (r - cell.height) // 2))
    sheet.save(out)
    return out


def build_report(name_or_path: str | Path, ctx: ContextConfig | None = None, cfg: ReportConfig | None = None,
                 coverage_cfg: CoverageConfig | None = None) -> dict:
    """Write report.json, report.html and contact_sheet.png into DATASET/report/; return the report."""
    cfg = cfg or ReportConfig()
    ds = open_prepared(name_or_path)
    out = ds.path / "report"
    out.mkdir(exist_ok=True)
    index = CoverageIndex.build(ds, ctx, coverage_cfg)
    report = {
        "dataset": {"name": ds.name, "version": ds.version, "items": len(ds), "resolution": ds.resolution,
                    "quarantined": ds.info.get("num_quarantined", 0)},
        "captions": caption_statistics(ds.captions, cfg.top_k),
        "attributes": attribute_balance(ds.captions, cfg.attributes),
        "near_duplicates": near_duplicate_clusters(ds, cfg.top_k),
        "embeddings": {"encoder": index.encoder.id, **embedding_spread(index, cfg.clusters)},
        "coverage": {"threshold": index.threshold},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    contact_sheet(ds, out / "contact_sheet.png", cfg.contact_sheet)
    (out / "report.html").write_text(_html(report))
    return report


def _html(r: dict) -> str:
    e = html.escape

    def table(rows, head):
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>{body}</table>"

    c, d = r["captions"], r["dataset"]
    parts = [f"<h1>Dataset {e(d['name'])}</h1><p>version {e(d['version'][:16])} · {d['items']} items · "
             f"{d['resolution']} px · {d['quarantined']} quarantined</p>",
             f"<h2>Captions</h2><p>{c['unique_captions']} unique of {c['num_captions']}; vocabulary "
             f"{c['vocabulary_size']} words; {c['words_per_caption']['mean']:.1f} words per caption</p>",
             "<h3>Most frequent concepts</h3>" + table(c["top_concepts"], ["concept", "captions"]),
             "<h3>Bigrams</h3>" + table(c["2-grams"], ["bigram", "count"])]
    for attr, a in r["attributes"].items():
        parts.append(f"<h3>Attribute: {e(attr)} (balance {a['balance']:.2f})</h3>"
                     + table(a["counts"].items(), ["value", "captions"])
                     + (f"<p class=warn>never mentioned: {e(', '.join(a['missing']))}</p>" if a["missing"] else ""))
    emb = r["embeddings"]
    parts.append(f"<h2>Caption embeddings ({e(emb['encoder'])})</h2><p>mean cosine distance to the centroid "
                 f"{emb['mean_cosine_distance_to_centroid']:.3f}</p>"
                 + table([(g["size"], " | ".join(g["examples"])) for g in emb["clusters"]], ["size", "examples"]))
    nd = r["near_duplicates"]
    parts.append(f"<h2>Near duplicates</h2><p>{nd['flagged_items']} flagged, {nd['quarantined_items']} "
                 "quarantined</p>" + table([(x["caption"], x["copies"]) for x in nd["largest_clusters"]],
                                           ["caption of the first copy", "copies"]))
    parts.append('<h2>Contact sheet</h2><img src="contact_sheet.png" style="image-rendering:pixelated;width:640px">')
    style = "body{font-family:sans-serif;max-width:900px;margin:auto}td,th{padding:2px 8px;text-align:left}" \
            ".warn{color:#b00}"
    return f"<!doctype html><meta charset=utf-8><title>{e(d['name'])}</title><style>{style}</style>" + "".join(parts)
