"""Opt-out audit: compare the original, each unlearned model and a model retrained without the
forget set (the gold standard), on forgetting, utility and cost.

Forgetting: forget-set loss at fixed draws (gap to the retrained model), a loss-based membership
inference AUC (forget vs. held-out tracks), and whether generations for prompts naming the artist
still sound like the artist (CLAP-audio similarity; nearest-artist-centroid assignment). Utility:
retain and holdout loss, Fréchet distance of generations for other artists' prompts (CLAP-audio),
text-audio agreement. Cost: seconds, and the fraction of the retraining time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.artifacts import atomic_path, hash_json, read_json, write_json
from linernotes.attribution.embeddings import audio_embeddings
from linernotes.attribution.losses import ScoreSettings, track_losses
from linernotes.clips import generate
from linernotes.config import Settings, require, setting
from linernotes.data.dataset import TrackDataset, collate
from linernotes.data.manifest import read_manifest
from linernotes.errors import LinernotesError
from linernotes.run import Retrainer, Run, load_run, retrain_seconds
from linernotes.unlearning.forget import ForgetSet, ForgetSpec, resolve_forget_set
from linernotes.unlearning.trainer import read_record

#: Hook for more embeddings of audio frames (e.g. basic-pitch from the similarity module):
#: fn(run, features (B, T, M) normalised, mask (B, T)) -> (B, D). Register one with
#: `EMBEDDERS["name"] = fn`; each adds an `fd_<name>` utility column (generated vs real).
EMBEDDERS: dict[str, Callable[[Run, torch.Tensor, torch.Tensor], np.ndarray]] = {}

#: Audit table columns shown in reports and docs, with their readable names.
METRICS = {
    "forget_loss": "Forget loss",
    "forget_gap": "Forget loss gap to retrained",
    "mia_auc": "MIA AUC (forget vs holdout)",
    "artist_similarity": "Audio similarity to the forget set",
    "artist_rate": "Artist assignment rate",
    "retain_loss": "Retain loss",
    "holdout_loss": "Holdout loss (other artists)",
    "fd_other": "Fréchet distance, audio embeddings (other artists)",
    "text_audio": "Text-audio agreement",
    "other_artist_rate": "Other prompts assigned to their artist",
    "seconds": "Seconds",
    "cost_fraction": "Fraction of retraining time",
}


@dataclasses.dataclass(frozen=True)
class AuditSettings(Settings):
    """What the audit measures and how strict its verdicts are."""

    score_timesteps: int = setting(10, "Fixed timesteps per track for the losses.")
    score_stride: int = setting(100, "Stride of those timesteps (of 1000).")
    seed: int = setting(0, "Seed of samples, prompts' noise and draws.")
    max_retain: int = setting(200, "Retain tracks scored (a seeded sample; 0 = all).")
    min_artist_holdout: int = setting(5, "Fewer holdout tracks of the artist: the membership "
                                      "test uses all artists' holdout tracks.")
    prompts: int = setting(8, "Prompts naming the forgotten artist(s).")
    other_prompts: int = setting(24, "Prompts of other artists (utility).")
    generate_steps: int = setting(25, "Sampler steps of the audit's generations.")
    guidance: float = setting(3.0, "Classifier-free guidance of the generations.")
    batch_size: int = setting(16, "Clips sampled together.")
    pairs: int = setting(2, "Before/after WAV pairs per method for the report (0 = none).")
    griffin_lim_iters: int = setting(16, "Vocoder iterations of those WAV pairs (reference "
                                     "family).")
    forget_tol: float = setting(0.03, "Verdict: forget loss within this of retrained.")
    auc_tol: float = setting(0.10, "Verdict: MIA AUC within this of retrained.")
    utility_tol: float = setting(0.05, "Verdict: retain/holdout loss rise at most.")
    resemblance_tol: float = setting(0.5, "Verdict: share of the original-to-retrained drop in "
                                     "resemblance to the artist that may remain.")

    def validate(self) -> None:
        require(self.score_timesteps >= 1 and self.score_stride >= 1,
                "score_timesteps and score_stride must be >= 1.")
        require(self.guidance >= 0 and self.griffin_lim_iters >= 1,
                "guidance must be >= 0 and griffin_lim_iters >= 1.")
        require(self.score_stride * (self.score_timesteps - 1) < 1000,
                "score_timesteps x score_stride must fit in 1000.")
        require(self.max_retain >= 0 and self.min_artist_holdout >= 1, "bad track counts.")
        require(self.prompts >= 1 and self.other_prompts >= 2, "prompts >= 1, other_prompts >= 2.")
        require(self.generate_steps >= 1 and self.batch_size >= 1, "steps and batch must be >= 1.")
        require(self.pairs >= 0, "pairs must be >= 0.")
        require(min(self.forget_tol, self.auc_tol, self.utility_tol) >= 0, "tolerances >= 0.")
        require(0 <= self.resemblance_tol <= 1, "resemblance_tol must be in [0, 1].")

    def score(self) -> ScoreSettings:
        return ScoreSettings(timesteps=self.score_timesteps, stride=self.score_stride,
                             seed=self.seed, precision="float32")  # as measured


#: AuditSettings fields that change no measured number (verdicts, report clips).
_PRESENTATION = ("pairs", "griffin_lim_iters", "forget_tol", "auc_tol", "utility_tol",
                 "resemblance_tol")


@dataclasses.dataclass
class AuditResult:
    """The audit table (one row per model), a verdict per unlearned model, and where it went."""

    table: pd.DataFrame
    verdicts: dict[str, str]
    passed: dict[str, bool]
    notes: list[str]
    forget: ForgetSet
    retrained: Path
    plot: Path
    optout_files: dict[str, Path]
    out_dir: Path

    def markdown(self) -> str:
        """The table and verdicts as Markdown."""
        return audit_markdown(self.table, self.verdicts, self.notes)


# ---------------------------------------------------------------- metrics


def membership_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """Loss-based membership inference AUC: P(a member's loss < a non-member's); ties count 1/2."""
    if len(members) == 0 or len(non_members) == 0:
        return math.nan
    m = np.asarray(members)[:, None]
    n = np.asarray(non_members)[None, :]
    return float(((m < n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return math.nan
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = np.cov(a, rowvar=False) + eps * np.eye(a.shape[1])
    cb = np.cov(b, rowvar=False) + eps * np.eye(b.shape[1])
    root = linalg.sqrtm(ca @ cb)
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def dataset_embeddings(run: Run, dataset: TrackDataset, batch_size: int = 64) -> np.ndarray:
    """Audio embeddings (N, D) of real tracks."""
    out = []
    for lo in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(lo, min(len(dataset), lo + batch_size))])
        out.append(audio_embeddings(run, batch["features"], batch["mask"], batch_size))
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


def generation_settings(run: Run, s: AuditSettings, **extra):
    """The family's generate settings for the audit's clips: its steps and guidance (and the
    `extra` settings its sampler has, e.g. the reference vocoder's iterations)."""
    cls = run.family.generate_settings
    values = {"steps": s.generate_steps, "guidance": s.guidance, **extra}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@torch.no_grad()
def generated_latents(run: Run, prompts: Sequence[str], seeds: Sequence[int],
                      s: AuditSettings) -> torch.Tensor:
    """Full-length latents (B, T, ...) for prompts with per-prompt seeds (same noise per model)."""
    g = generation_settings(run, s)
    n_frames = run.task.latent_shape[0]
    out = [run.family.sample(prompts[i:i + s.batch_size], seeds[i:i + s.batch_size], n_frames,
                             g) for i in range(0, len(prompts), s.batch_size)]
    return torch.cat(out)


@dataclasses.dataclass
class _AuditData:
    """Everything fixed across models: datasets, prompts, real-audio references."""

    forget: TrackDataset
    retain: TrackDataset
    holdout: TrackDataset
    holdout_other: np.ndarray  # positions in `holdout` of other artists' tracks
    mia_negatives: np.ndarray  # positions in `holdout` used as non-members
    prompts: list[str]
    other_prompts: list[str]
    other_artists: list[str]  # the artist each other prompt names
    seeds: list[int]
    other_seeds: list[int]
    centroids: np.ndarray  # (A, D) artist centroids of real train audio
    centroid_artists: list[str]
    forget_centroid: np.ndarray
    forget_artists: list[str]
    real_other: np.ndarray  # CLAP audio embeddings of other artists' real tracks (a sample)
    real_extra: dict[str, np.ndarray]  # EMBEDDERS' embeddings of a smaller real sample
    other_text: np.ndarray | None  # text embeddings of other prompts (None: no text embedder)
    notes: list[str]
    key: str


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _prepare(original: Run, manifest: pd.DataFrame, forget: ForgetSet, s: AuditSettings,
             progress: bool) -> _AuditData:
    store = original.feature_store(manifest, progress=progress)
    ids = manifest["track_id"].astype(str)
    artists = manifest["artist"].astype(str).to_numpy()
    split = manifest["split"].astype(str).to_numpy()
    pos = {t: i for i, t in enumerate(ids)}
    rng = np.random.default_rng(s.seed)
    notes: list[str] = []

    def ds(rows) -> TrackDataset:
        return TrackDataset(store, manifest, np.asarray(sorted(rows), dtype=np.int64))

    retain_rows = [pos[t] for t in forget.retain_ids]
    if s.max_retain and len(retain_rows) > s.max_retain:
        retain_rows = rng.choice(retain_rows, s.max_retain, replace=False).tolist()
        notes.append(f"Retain loss over a seeded sample of {s.max_retain} of "
                     f"{len(forget.retain_ids)} retain tracks.")
    forget_ds = ds([pos[t] for t in forget.forget_ids])
    holdout_ds = ds(np.flatnonzero(split == "holdout"))
    h_art = artists[holdout_ds.rows]
    in_forget = np.isin(h_art, list(forget.artists))
    same = np.flatnonzero(in_forget)
    if len(same) >= s.min_artist_holdout:
        negatives = same
    else:
        negatives = np.arange(len(holdout_ds))
        who = ", ".join(forget.artists) or "the forgotten tracks' artists"
        notes.append(f"{who} has only {len(same)} holdout track(s) (< {s.min_artist_holdout}); "
                     f"the membership test uses the holdout tracks of all artists "
                     f"({len(negatives)}).")
    if len(negatives) == 0:
        notes.append("No holdout tracks: the membership inference AUC is undefined.")

    # prompts naming the artist: the forget tracks' own captions
    captions = manifest["caption"].astype(str).to_numpy()
    f_caps = list(dict.fromkeys(captions[forget_ds.rows]))
    pick = np.linspace(0, len(f_caps) - 1, min(s.prompts, len(f_caps))).round().astype(int)
    prompts = [f_caps[i] for i in dict.fromkeys(pick.tolist())]
    if forget.artists and not any(a.lower() in p.lower() for p in prompts for a in forget.artists):
        notes.append("The forget tracks' captions do not name their artist; the artist prompts "
                     "are those captions as they are.")

    # other artists: prompts (holdout captions first) and real audio
    removed = set(forget.removed_before) | set(forget.forget_ids)
    pool_mask = ~ids.isin(removed).to_numpy()
    others = sorted({a for a in artists[pool_mask & (split == "train")]} - set(forget.artists))
    if not others:
        raise LinernotesError("No other artist remains to measure utility on; the audit needs "
                              "a corpus with more than the forgotten artist(s).")
    queues = {}
    for a in others:
        rows = np.flatnonzero((artists == a) & pool_mask)
        queues[a] = sorted(rows, key=lambda r: (split[r] != "holdout", int(rng.integers(1 << 30))))
    other_prompts, other_artists = [], []
    for k in range(max(len(q) for q in queues.values())):  # round robin over the artists
        for a in others:
            if k < len(queues[a]) and len(other_prompts) < s.other_prompts:
                other_prompts.append(captions[queues[a][k]])
                other_artists.append(a)

    train_rows = np.flatnonzero((split == "train") & ~ids.isin(forget.removed_before).to_numpy())
    train_emb = dataset_embeddings(original, ds(train_rows))
    train_art = artists[np.sort(train_rows)]
    cent_artists = sorted(set(train_art))
    centroids = _normalise(np.stack([train_emb[train_art == a].mean(0) for a in cent_artists]))
    forget_emb = dataset_embeddings(original, forget_ds)
    real_rows = np.flatnonzero(np.isin(artists, others) & pool_mask)
    if len(real_rows) > 512:
        real_rows = rng.choice(real_rows, 512, replace=False)
    try:
        other_text = original.family.embed_text(other_prompts).numpy()
    except LinernotesError as exc:
        other_text = None
        notes.append(f"No text-audio agreement: {exc}")
    measured = {k: v for k, v in s.to_dict().items() if k not in _PRESENTATION}
    key = hash_json({"forget": sorted(forget.forget_ids), "settings": measured,
                     "prompts": prompts, "other": other_prompts, "embedders": sorted(EMBEDDERS),
                     "retain": sorted(int(r) for r in retain_rows)})
    return _AuditData(
        forget=forget_ds, retain=ds(retain_rows), holdout=holdout_ds,
        holdout_other=np.flatnonzero(~in_forget), mia_negatives=negatives,
        prompts=prompts, other_prompts=other_prompts, other_artists=other_artists,
        seeds=[1000 + i for i in range(len(prompts))],
        other_seeds=[5000 + i for i in range(len(other_prompts))],
        centroids=centroids, centroid_artists=cent_artists,
        forget_centroid=_normalise(forget_emb.mean(0)), forget_artists=list(forget.artists),
        real_other=dataset_embeddings(original, ds(real_rows)),
        real_extra=_extra_embeddings(original, ds(real_rows[: len(other_prompts)])),
        other_text=other_text,
        notes=notes, key=key,
    )


def _extra_embeddings(run: Run, dataset: TrackDataset) -> dict[str, np.ndarray]:
    """Each registered EMBEDDERS' embeddings of real tracks (the utility reference)."""
    if not EMBEDDERS or len(dataset) == 0:
        return {}
    real = collate([dataset[i] for i in range(len(dataset))])
    return {name: np.asarray(fn(run, real["features"].float(), real["mask"]))
            for name, fn in EMBEDDERS.items()}


def model_metrics(run: Run, data: _AuditData, s: AuditSettings, cache: Path) -> dict:
    """The audit's metrics for one model (cached by model hash and audit inputs)."""
    path = cache / f"{run.hash}-{data.key}.json"
    if path.exists():
        return read_json(path)
    score = s.score()
    f_loss = track_losses(run.task, run.model, data.forget, score)
    r_loss = track_losses(run.task, run.model, data.retain, score)
    h_loss = track_losses(run.task, run.model, data.holdout, score)
    lat = generated_latents(run, data.prompts, data.seeds, s)
    emb = run.family.embed_audio(lat, torch.ones(lat.shape[:2], dtype=torch.bool)).numpy()
    lat_o = generated_latents(run, data.other_prompts, data.other_seeds, s)
    emb_o = run.family.embed_audio(lat_o, torch.ones(lat_o.shape[:2], dtype=torch.bool)).numpy()
    nearest = np.asarray(data.centroid_artists)[np.argmax(emb @ data.centroids.T, axis=1)]
    nearest_o = np.asarray(data.centroid_artists)[np.argmax(emb_o @ data.centroids.T, axis=1)]
    metrics = {
        "forget_loss": float(f_loss.mean()),
        "retain_loss": float(r_loss.mean()),
        "holdout_loss": float(h_loss[data.holdout_other].mean())
        if len(data.holdout_other) else math.nan,
        "mia_auc": membership_auc(f_loss, h_loss[data.mia_negatives]),
        "artist_similarity": float((emb @ data.forget_centroid).mean()),
        "artist_rate": float(np.isin(nearest, data.forget_artists).mean()),
        "fd_other": frechet_distance(emb_o, data.real_other),
        "text_audio": (float((emb_o * data.other_text).sum(1).mean())
                       if data.other_text is not None else math.nan),
        "other_artist_rate": float((nearest_o == np.asarray(data.other_artists)).mean()),
    }
    full_o = torch.ones(lat_o.shape[:2], dtype=torch.bool)
    for name, real in data.real_extra.items():
        metrics[f"fd_{name}"] = frechet_distance(np.asarray(EMBEDDERS[name](run, lat_o, full_o)),
                                                 real)
    write_json(path, metrics)
    return metrics


# ---------------------------------------------------------------- verdicts


def verdict(row: Mapping, original: Mapping, retrained: Mapping, s: AuditSettings
            ) -> tuple[bool, str]:
    """Pass/fail and a sentence: forgetting near the retrained model, utility near the original."""
    problems = []
    gap, gap_o = float(row["forget_gap"]), float(original["forget_gap"])
    if gap < -s.forget_tol:
        problems.append(f"under-forgets (forget loss {-gap:.1%} below the retrained model's; "
                        f"the original: {gap_o:+.1%})")
    elif gap > s.forget_tol:
        problems.append(f"over-forgets (forget loss {gap:.1%} above the retrained model's, "
                        "beyond retraining)")
    auc, ref_auc = float(row["mia_auc"]), float(retrained["mia_auc"])
    if math.isfinite(auc) and math.isfinite(ref_auc):
        if auc - ref_auc > s.auc_tol:
            problems.append(f"membership still detectable (MIA AUC {auc:.2f} vs {ref_auc:.2f} "
                            "retrained)")
        elif ref_auc - auc > s.auc_tol:
            problems.append(f"MIA AUC {auc:.2f} below the retrained {ref_auc:.2f} (the forget "
                            "tracks now look less familiar than unseen ones)")
    sim, sim_o, sim_r = (float(r["artist_similarity"]) for r in (row, original, retrained))
    if sim_o - sim_r > 0.05 and (sim - sim_r) > s.resemblance_tol * (sim_o - sim_r):
        problems.append(
            f"generations for the artist's prompts still resemble the artist (CLAP similarity "
            f"{sim:.2f}; original {sim_o:.2f}, retrained {sim_r:.2f}; assigned to the artist "
            f"{float(row['artist_rate']):.0%} vs {float(retrained['artist_rate']):.0%} retrained)")
    changes = {
        name: (float(row[col]) - float(original[col])) / float(original[col])
        for name, col in (("retain", "retain_loss"), ("holdout", "holdout_loss"))
        if math.isfinite(float(original[col])) and float(original[col]) > 0
    }
    worst = max(changes, key=changes.get) if changes else None
    utility = changes[worst] if worst else 0.0
    if utility > s.utility_tol:
        problems.append(f"utility: {worst} loss +{utility:.1%} vs the original")
    if problems:
        return False, "fails: " + "; ".join(problems) + "."
    cost = float(row.get("cost_fraction", math.nan))
    cost_text = f"; {cost:.1%} of the retraining time" if math.isfinite(cost) else ""
    auc_text = (f", MIA AUC {auc:.2f} vs {ref_auc:.2f}"
                if math.isfinite(auc) and math.isfinite(ref_auc) else "")
    return True, (f"passes: forget loss within {abs(gap):.1%} of retrained (the original: "
                  f"{gap_o:+.1%}){auc_text}; "
                  f"utility within {max(utility, 0.0):.1%} of the original{cost_text}.")


# ---------------------------------------------------------------- the audit


def _label_runs(runs: Sequence[Run]) -> list[str]:
    labels, seen = [], {}
    for run in runs:
        name = read_record(run)["method"]
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return labels


def audit(
    original_run: str | Path | Run,
    unlearned_runs: Sequence[str | Path | Run],
    manifest: str | Path | pd.DataFrame,
    forget_spec: ForgetSpec | str | Mapping,
    out_dir: str | Path,
    retrain_steps: int = 0,
    settings: AuditSettings | None = None,
    retrain_dir: str | Path | None = None,
    progress: bool = True,
) -> AuditResult:
    """Audit unlearned runs against the original and a retrained-without-forget-set reference.

    The reference comes from the original run's retrain cache (`retrain_dir` to put it
    elsewhere), trained with the original's recipe (`retrain_steps` > 0: fewer steps, a cheaper
    and weaker reference). Writes into out_dir: audit.csv/.md/.json, audit.png, generated
    before/after clips and one `optout-<method>.json` per method (readable by
    `report.build.OptOut.from_dict`).
    """
    s = settings or AuditSettings()
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    original = original_run if isinstance(original_run, Run) else load_run(original_run,
                                                                             manifest=df)
    exclude = original.config.get("train", {}).get("exclude", []) or []
    forget = resolve_forget_set(df, forget_spec, exclude, original.removed_tracks())
    runs = [r if isinstance(r, Run) else load_run(r, manifest=df) for r in unlearned_runs]
    for run in runs:
        rec = read_record(run)
        if rec["base"]["hash"] != original.hash:
            raise LinernotesError(f"{run.path} was unlearned from run {rec['base']['hash']}, not "
                                  f"from {original.path}; audit it against its own base.")
        if set(rec["removed"]["track_ids"]) != set(forget.forget_ids):
            raise LinernotesError(f"{run.path} removed other tracks than the forget set "
                                  f"{forget.spec.describe()!r}; audit it with its own forget set.")
    labels = _label_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    retrained = Retrainer(original, df, retrain_dir, progress=progress)(
        forget.forget_ids, steps=retrain_steps or None)
    retrain_secs = retrain_seconds(retrained)
    data = _prepare(original, df, forget, s, progress)
    notes = list(data.notes)
    rows = []
    models = [("original", "", original), ("retrained", "retrain", retrained)]
    models += [(label, read_record(r)["method"], r) for label, r in zip(labels, runs)]
    for label, method, run in models:
        m = model_metrics(run, data, s, out / "metrics")
        cost = read_record(run)["cost"] if method not in ("", "retrain") else {}
        if method == "retrain":
            cost = {"steps": run.config.get("steps", math.nan)}
        seconds = retrain_secs if method == "retrain" else cost.get("seconds", math.nan)
        rows.append({"model": label, "method": method or "none", **m,
                     "seconds": seconds, "steps": cost.get("steps", math.nan),
                     "run": str(run.path)})
    table = pd.DataFrame(rows)
    ref = table.iloc[1]
    table["forget_gap"] = (table["forget_loss"] - ref["forget_loss"]) / ref["forget_loss"]
    table["cost_fraction"] = table["seconds"] / retrain_secs
    table.loc[0, "cost_fraction"] = math.nan
    cols = ["model", "method", *[c for c in METRICS if c in table.columns], "steps",
            *[c for c in table.columns if c.startswith("fd_") and c != "fd_other"], "run"]
    table = table[list(dict.fromkeys(cols))]
    verdicts, passed = {"original": "reference (before unlearning)",
                        "retrained": "reference (gold standard)"}, {}
    for i in range(2, len(table)):
        ok, text = verdict(table.iloc[i], table.iloc[0], ref, s)
        verdicts[table.iloc[i]["model"]] = text
        passed[table.iloc[i]["model"]] = ok
    orig = table.iloc[0]
    auc_close = not (abs(orig["mia_auc"] - ref["mia_auc"]) > s.auc_tol)  # NaN counts as close
    if abs(orig["forget_gap"]) <= s.forget_tol and auc_close:
        notes.append("The original model is already within the forgetting tolerance of the "
                     "retrained one: it barely memorised these tracks, so this audit cannot "
                     "tell methods apart on forgetting.")
    if not math.isfinite(retrain_secs):
        notes.append("The retraining time is unknown (cached without a record): no cost "
                     "fractions.")
    plot = audit_plot(table, out / "audit.png", ", ".join(forget.artists) or "forget set")
    files = _optout_files(out, table, verdicts, notes, forget, original, runs, labels, data, s)
    table.to_csv(out / "audit.csv", index=False)
    result = AuditResult(table, verdicts, passed, notes, forget, Path(retrained.path), plot,
                         files, out)
    (out / "audit.md").write_text(result.markdown() + "\n", encoding="utf-8")
    write_json(out / "audit.json", {
        "kind": "linernotes-audit", "forget": forget.to_dict(), "settings": s.to_dict(),
        "retrained": str(retrained.path), "retrain_seconds": retrain_secs,
        "table": json_rows(table), "verdicts": verdicts, "notes": notes,
    })
    return result


def json_rows(table: pd.DataFrame) -> list[dict]:
    """Table rows as JSON-safe dicts (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in row.items()} for row in table.to_dict(orient="records")]


# ---------------------------------------------------------------- outputs


def audit_markdown(table: pd.DataFrame, verdicts: Mapping[str, str],
                   notes: Sequence[str] = ()) -> str:
    """A Markdown table (one row per model) followed by the verdicts and notes."""
    cols = [c for c in METRICS if c in table.columns]
    head = "| model | " + " | ".join(METRICS[c] for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for _, row in table.iterrows():
        cells = [_fmt(row[c], c) for c in cols]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{k}**: {v}" for k, v in verdicts.items()]
    lines += [f"- Note: {n}" for n in notes]
    return "\n".join(lines)


def _fmt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if column in ("forget_gap", "cost_fraction"):
        return f"{value:+.1%}" if column == "forget_gap" else f"{value:.1%}"
    if column == "seconds":
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def audit_plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Forgetting vs utility, MIA AUC and artist resemblance of generations, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig = table.iloc[0]
    util = (table["retain_loss"] - orig["retain_loss"]) / orig["retain_loss"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.4))
    for i, row in table.iterrows():
        marker = {"original": "s", "retrained": "*"}.get(row["model"], "o")
        a.scatter(row["forget_gap"] * 100, util[i] * 100, marker=marker, s=90 if marker == "*"
                  else 45, zorder=3)
        a.annotate(row["model"], (row["forget_gap"] * 100, util[i] * 100), fontsize=8,
                   xytext=(4, 3), textcoords="offset points")
    a.axvline(0, color="grey", lw=0.8, ls="--")
    a.axhline(0, color="grey", lw=0.8, ls="--")
    a.set_xlabel("forget loss vs retrained (%)")
    a.set_ylabel("retain loss vs original (%)")
    a.set_title("Forgetting (x) and utility (y)")
    colors = ["tab:gray", "tab:green"] + ["tab:blue"] * (len(table) - 2)
    b.bar(range(len(table)), table["mia_auc"].fillna(0), color=colors)
    ref = table.iloc[1]["mia_auc"]
    if math.isfinite(ref):
        b.axhline(ref, color="tab:green", lw=1, ls="--", label="retrained")
    b.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    b.set_xticks(range(len(table)), table["model"], rotation=35, ha="right", fontsize=8)
    b.set_ylabel("membership inference AUC")
    b.set_title("Forget vs holdout (loss-based)")
    b.legend(fontsize=8)
    c.bar(range(len(table)), table["artist_similarity"], color=colors)
    c.axhline(table.iloc[1]["artist_similarity"], color="tab:green", lw=1, ls="--",
              label="retrained")
    c.set_xticks(range(len(table)), table["model"], rotation=35, ha="right", fontsize=8)
    c.set_ylabel("audio similarity to the forget set")
    c.set_title("Generations for the artist's prompts")
    c.legend(fontsize=8)
    fig.suptitle(f"Opt-out audit: {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clips(run: Run, prompts: list[str], seeds: list[int], folder: Path, s: AuditSettings
           ) -> list[Path]:
    marker = folder / "clips.json"
    if marker.exists():
        done = read_json(marker)
        if done.get("run") == run.hash and done.get("prompts") == prompts:
            return [Path(p) for p in done["paths"]]
    g = generation_settings(run, s, griffin_lim_iters=s.griffin_lim_iters)
    paths = generate(run, prompts, folder, seeds=seeds, settings=g, progress=False)
    write_json(marker, {"run": run.hash, "prompts": prompts, "paths": [str(p) for p in paths]})
    return paths


def _optout_files(out: Path, table: pd.DataFrame, verdicts: Mapping[str, str], notes: list[str],
                  forget: ForgetSet, original: Run, runs: list[Run], labels: list[str],
                  data: _AuditData, s: AuditSettings) -> dict[str, Path]:
    """One OptOut JSON per method: the audit (metrics x models) and before/after clip pairs."""
    cols = [c for c in METRICS if c in table.columns]
    audit_dict = {METRICS[c]: {row["model"]: (None if pd.isna(row[c]) else float(row[c]))
                               for _, row in table.iterrows()} for c in cols}
    prompts, seeds = data.prompts[: s.pairs], data.seeds[: s.pairs]
    before = _clips(original, prompts, seeds, out / "clips" / "original", s) if prompts else []
    artist = ", ".join(forget.artists) or forget.spec.describe()
    files = {}
    for label, run in zip(labels, runs):
        after = _clips(run, prompts, seeds, out / "clips" / label, s) if prompts else []
        doc = {
            "artist": artist,
            "method": label,
            "audit": audit_dict,
            "pairs": [{"prompt": p, "before": str(b.resolve()), "after": str(a.resolve())}
                      for p, b, a in zip(prompts, before, after)],
            "note": " ".join([f"{len(forget.forget_ids)} tracks removed; {label} "
                              f"{verdicts[label]}", *notes]),
        }
        files[label] = out / f"optout-{label}.json"
        with atomic_path(files[label]) as tmp:  # key order kept: metrics and models in order
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return files
