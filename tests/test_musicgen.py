"""The musicgen family on a tiny random MusicGen of the real transformers classes, saved with
`save_pretrained` as a user's folder: init, the per-sample loss against the model's own, opt-out
output that transformers reloads, attribution self-rank after fine-tuning, bad folders refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from linernotes.cli import app
from linernotes.data.dataset import TrackDataset, collate
from linernotes.data.manifest import read_manifest
from linernotes.errors import LinernotesError
from linernotes.models.family import recognise
from linernotes.run import load_run
from linernotes.task import draw_noise, loss_at_draws
from linernotes.training import TrainSettings

from conftest import assert_a_reload_reads_the_captions_kept, make_tiny_musicgen, make_tone_corpus

FINETUNE = TrainSettings(steps=400, batch_size=4, lr=1e-2, warmup=5)


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def mg(tmp_path_factory):
    root = tmp_path_factory.mktemp("musicgen")
    make_tiny_musicgen(root / "musicgen")
    make_tone_corpus(root / "corpus")
    manifest = read_manifest(root / "corpus")
    out = cli("init", "--model", root / "musicgen", "--corpus", root / "corpus", "-o",
              root / "run")
    assert "(musicgen)" in out
    run = load_run(root / "run", manifest=manifest)
    ft = run.family.finetune(manifest, root / "ft", FINETUNE, progress=False)
    return {"root": root, "manifest": manifest, "run": run, "ft": ft}


def _batch(run, manifest, rows):
    store = run.feature_store(manifest, progress=False)
    ds = TrackDataset(store, manifest, rows)
    return collate([ds[i] for i in range(len(rows))])


def _one(batch, i):
    return {k: (v[i : i + 1] if isinstance(v, (torch.Tensor, list)) else v)
            for k, v in batch.items()}


def test_init_encodes_every_track_to_codes_and_resumes(mg):
    run, manifest, root = mg["run"], mg["manifest"], mg["root"]
    assert run.family.name == "musicgen" and run.task.deterministic
    store = run.feature_store(manifest, progress=False)
    g = run.config["features"]
    assert store.values.shape == (len(manifest), g["n_frames"], g["n_codebooks"])
    codes = np.asarray(store.values)
    assert np.array_equal(codes, np.rint(codes)) and codes.min() >= 0 and codes.max() < 64
    assert len({codes[i].tobytes() for i in range(len(manifest))}) == len(manifest)
    # a track's real frames follow its length (50 frames per second)
    real = np.asarray(store.mask).sum(1)
    expected = np.ceil(manifest["duration"].to_numpy() * 50).clip(max=g["n_frames"])
    assert np.array_equal(real, expected)
    again = recognise(root / "musicgen").init_run(root / "musicgen", manifest, root / "run",
                                                   progress=False)
    assert again.hash == run.hash
    other = root / "other-musicgen"
    make_tiny_musicgen(other)
    (other / "generation_config.json").write_text(json.dumps({"top_k": 5}))
    with pytest.raises(LinernotesError, match="another model"):
        recognise(other).init_run(other, manifest, root / "run", progress=False)


def test_per_sample_loss_is_the_models_own_loss_and_needs_no_draws(mg):
    run, manifest = mg["ft"], mg["manifest"]
    task, model = run.task, run.model
    batch = _batch(run, manifest, [0, 3, 5])
    t, noise = draw_noise(batch["track_id"], range(4), task.latent_shape)
    together = loss_at_draws(task, model, batch, t, noise)
    for i in range(3):
        one = _one(batch, i)
        tok = run.family.tokenizer(one["caption"], return_tensors="pt")
        own = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    labels=task.labels(one, torch.device("cpu"))).loss
        alone = task.per_sample_loss(model, one, t[i, :1], noise[i, :1])
        assert torch.allclose(own, alone[0], atol=1e-5)
        assert torch.allclose(together[i], alone[0], atol=1e-5)  # batch-independent
        # the draws are ignored: another timestep and noise give the same loss
        other = task.per_sample_loss(model, one, torch.rand(1), torch.randn(1, *task.latent_shape))
        assert torch.equal(other, alone)


def test_a_reloaded_run_reads_its_kept_caption_encodings(mg):
    captions = list(dict.fromkeys(mg["manifest"]["caption"]))[:3]
    assert_a_reload_reads_the_captions_kept(mg["run"].path, captions,
                                            lambda task, c: task.text(c))


def test_stereo_musicgen_interleaves_left_and_right_codebooks(tmp_path):
    make_tiny_musicgen(tmp_path / "stereo", channels=2)
    make_tone_corpus(tmp_path / "corpus", n_per_artist=2)
    manifest = read_manifest(tmp_path / "corpus")
    run = recognise(tmp_path / "stereo").init_run(tmp_path / "stereo", manifest,
                                                  tmp_path / "run", progress=False)
    assert run.config["features"]["n_codebooks"] == 4
    batch = _batch(run, manifest, [0, 1])
    one = _one(batch, 0)
    tok = run.family.tokenizer(one["caption"], return_tensors="pt")
    own = run.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    labels=run.task.labels(one, torch.device("cpu"))).loss
    t, noise = torch.zeros(1), torch.zeros(1, *run.task.latent_shape)
    assert torch.allclose(own, run.task.per_sample_loss(run.model, one, t, noise)[0], atol=1e-5)
    audio = run.family.decode(batch["features"][0].numpy(), batch["mask"][0].numpy())
    assert audio.ndim == 2 and audio.shape[1] == 2


def test_attribution_ranks_the_training_track_first(mg):
    from linernotes.attribution.front import attribute_run

    run, manifest, root = mg["ft"], mg["manifest"], mg["root"]
    ids = ["alpha-01", "beta-02", "gamma-00"]
    tables = attribute_run(run, manifest, [f"train:{i}" for i in ids], root / "scores",
                           progress=False)
    for tid, table in zip(ids, tables):
        assert table.loc[table["rank"] == 1, "track_id"].tolist() == [tid]
    # any audio file with a caption is a query too: a copy of a training track finds it
    audio, sr = sf.read(root / "corpus" / "audio" / "beta-01.wav")
    sf.write(root / "mine.wav", audio, sr)
    caption = manifest.set_index("track_id").loc["beta-01", "caption"]
    (table,) = attribute_run(run, manifest, [str(root / "mine.wav")], root / "scores2",
                             caption=caption, progress=False)
    assert table.loc[table["rank"] == 1, "track_id"].tolist() == ["beta-01"]


def test_generate_attribute_and_credit_a_clip_from_the_command_line(mg):
    root = mg["root"]
    clip = root / "clip.wav"
    cli("generate", "--run", root / "ft", "Morning, a tune by Alpha played on sine", "-o", clip,
        "--seconds", 1.0)
    audio, sr = sf.read(clip)
    assert sr == 8000 and len(audio) == 8000 and np.isfinite(audio).all()
    side = json.loads(clip.with_suffix(".json").read_text())
    assert side["n_real_frames"] == 50 and side["guidance"] == 3.0
    out = cli("attribute", "--run", root / "ft", "--corpus", root / "corpus", clip, "--top", 3,
              "-o", root / "clip-scores")
    assert "rank" in out
    out = cli("credit", "--run", root / "ft", "--corpus", root / "corpus", clip, "-o",
              root / "credit")
    assert "Alpha" in out and "Beta" in out


def test_optout_output_is_a_musicgen_folder_transformers_loads(mg):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    root = mg["root"]
    common = ["--run", root / "ft", "--corpus", root / "corpus", "--forget", "artist=Alpha"]
    out = cli("optout", *common, "--method", "gradient_ascent", "-o", root / "ga")
    assert "Forget-set loss" in out
    before, after = (float(x) for x in
                     out.split("Forget-set loss at fixed draws: ")[1].split(" (")[0].split(" -> "))
    assert after > before  # gradient ascent raised the forget set's loss
    cli("optout", *common, "--method", "random_label", "-o", root / "rl")
    model = MusicgenForConditionalGeneration.from_pretrained(root / "ga" / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "ga" / "model")
    assert tokenizer("a tune").input_ids
    ft = mg["ft"].model.state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, ft[k])]
    assert changed and all(k.startswith("decoder.") for k in changed)  # T5, EnCodec untouched
    res = CliRunner().invoke(app, [str(a) for a in ("optout", *common, "--method",
                                                      "concept_ablation", "-o", root / "ca")])
    assert res.exit_code != 0 and "autoregressive" in str(res.exception or res.output)
    out = cli("audit", root / "ga", "--corpus", root / "corpus", "-o", root / "audit")
    assert (root / "audit" / "audit.csv").exists() and "gradient_ascent" in out


def test_a_musicgen_folder_without_a_part_is_refused(tmp_path, mg):
    root = mg["root"]
    folder = tmp_path / "mg"
    shutil.copytree(root / "musicgen", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    res = CliRunner().invoke(app, ["init", "--model", str(folder), "--corpus",
                                   str(root / "corpus"), "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "tokenizer" in str(res.exception or res.output)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LinernotesError, match="without weights"):
        recognise(folder).init_run(folder, mg["manifest"], tmp_path / "r2", progress=False)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LinernotesError, match="broken config.json"):
        recognise(folder)


def test_a_loss_without_draws_is_computed_once_per_track_everywhere(mg, monkeypatch):
    from linernotes.curvature import FisherSettings, compute_fisher

    run, manifest = mg["ft"], mg["manifest"]
    task = run.task
    seen = []
    original = task.per_sample_loss

    def counted(model, batch, t, noise, mask_padding=False):
        seen.append(len(batch["caption"]))
        return original(model, batch, t, noise, mask_padding)

    monkeypatch.setattr(task, "per_sample_loss", counted)
    store = run.feature_store(manifest, progress=False)
    rows = list(range(6))
    data = TrackDataset(store, manifest, rows)
    one = compute_fisher(task, run.model, data, FisherSettings(group="cross_attn", draws=4),
                         run.hash, progress=False)
    assert sum(seen) == len(rows)  # 6 losses, not 6 x 4
    seen.clear()
    single = compute_fisher(task, run.model, data, FisherSettings(group="cross_attn", draws=1),
                            run.hash, progress=False)
    for name in one.diag:
        assert torch.allclose(one.diag[name], single.diag[name])
    assert sum(seen) == len(rows)


@pytest.mark.parametrize("method", ["unlearning-linear", "mucs", "trak", "dtrak", "tracin",
                                    "fisher-influence", "representer", "chroma-mfcc",
                                    "lpips-dit"])
def test_every_attribution_method_finds_a_training_track_on_musicgen(mg, method):
    from linernotes.attribution.front import attribute_run

    run, manifest, root = mg["ft"], mg["manifest"], mg["root"]
    (table,) = attribute_run(run, manifest, ["train:alpha-01"], root / f"m-{method}",
                             method=method, progress=False)
    assert np.isfinite(table["score"]).all()
    # the track itself is among the top 2 of 9 (the last-layer representer is the weakest)
    assert "alpha-01" in table.loc[table["rank"] <= 2, "track_id"].tolist()


def test_a_text_audio_measure_says_musicgen_has_no_text_audio_encoder(mg):
    from linernotes.attribution.front import attribute_run

    with pytest.raises(LinernotesError, match="no text-audio embedder"):
        attribute_run(mg["ft"], mg["manifest"], ["train:alpha-01"], mg["root"] / "ct",
                      method="clap-text", progress=False)


def test_a_fine_tune_does_not_depend_on_what_ran_before(mg, tmp_path):
    run, manifest = mg["run"], mg["manifest"]
    short = TrainSettings(steps=5, batch_size=4, lr=1e-2, warmup=1)
    weights = []
    for i, seed in enumerate((1, 2)):
        torch.manual_seed(seed)  # another history of the global generator (dropout draws)
        torch.rand(100)
        ft = run.family.finetune(manifest, tmp_path / f"ft{i}", short, progress=False)
        weights.append((ft.path / "model" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
