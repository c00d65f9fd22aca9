"""The reference model: CLAP, denoiser, Task, training loop (resume), runs, generation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from linernotes.clips import clip_batch, generate, load_clip
from linernotes.data.dataset import TrackDataset, split_rows
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import read_manifest, write_manifest
from linernotes.errors import LinernotesError
from linernotes.models.clap import ClapSettings, clap_from_settings, evaluate_clap, freeze
from linernotes.models.denoiser import Denoiser, DenoiserConfig, count_parameters
from linernotes.models.mel import FeatureSettings, FeatureStats
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train, train_clap
from linernotes.models.task import ReferenceTask
from linernotes.run import load_run
from linernotes.task import PARAM_GROUPS, draw_noise, loss_at_draws
from linernotes.training import DiffusionLoss, StepBatches, TrainSettings, fit, training_rows

SR = 16000
FEATS = FeatureSettings(seconds=2.0, hop_length=1000, n_mels=32)  # 32 frames
ARTISTS = {"Aldo": 220.0, "Bea": 277.2, "Cyd": 329.6, "Dov": 392.0, "Eli": 466.2, "Fay": 554.4}
INSTRUMENTS = {
    "organ": (1.0, 0.5, 0.3, 0.2),
    "flute": (1.0, 0.1, 0.0, 0.0),
    "choir": (1.0, 0.0, 0.4, 0.0),
}
TINY_DIT = DenoiserConfig(
    layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=32, time_proj_dim=32, max_words=12
)
TINY_CLAP = ClapSettings(
    dim=32, hidden=48, layers=2, steps=60, batch_size=24, lr=3e-3, checkpoint_every=1000
)


def _tone(f0: float, harmonics, seconds: float, rhythm: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t) for k, a in enumerate(harmonics))
    x = x + 0.6 * np.sin(2 * np.pi * f0 * 1.5 * t) * (np.sin(2 * np.pi * rhythm * t) > 0)
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """60 tracks: pitch from the artist, timbre from the instrument; 2 holdout per artist."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for artist, f0 in ARTISTS.items():
        for j in range(10):
            inst = list(INSTRUMENTS)[j % 3]
            seconds = 2.0 if j % 4 else 1.2  # some short tracks: padding
            tid = f"{artist.lower()}-{j}"
            sf.write(
                root / f"{tid}.wav",
                _tone(f0 * (1 + 0.01 * j), INSTRUMENTS[inst], seconds, 2 + j % 3),
                SR,
            )
            rows.append(
                {
                    "track_id": tid,
                    "path": f"{tid}.wav",
                    "artist": artist,
                    "instrument": inst,
                    "caption": f"a {inst} piece by {artist}",
                    "duration": seconds,
                    "sample_rate": SR,
                    "split": "holdout" if j >= 8 else "train",
                }
            )
    path = write_manifest(pd.DataFrame(rows), root)
    df = read_manifest(path)
    store = FeatureStore.open(df, FEATS, progress=False, workers=1)
    return path, df, store


@pytest.fixture(scope="session")
def clap_dir(corpus, tmp_path_factory):
    path, _, _ = corpus
    return train_clap(path, tmp_path_factory.mktemp("clap"), TINY_CLAP, FEATS, progress=False)


@pytest.fixture(scope="session")
def run(corpus, clap_dir, tmp_path_factory):
    path, _, _ = corpus
    settings = TrainSettings(steps=20, batch_size=16, lr=2e-3, warmup=5, checkpoint_every=10)
    return train(
        path,
        tmp_path_factory.mktemp("run"),
        settings,
        TINY_DIT,
        FEATS,
        clap=clap_dir,
        progress=False,
    )


def _tiny(store_df):
    df, store = store_df
    torch.manual_seed(0)
    clap = freeze(clap_from_settings(FEATS.n_mels, TINY_CLAP))
    task = ReferenceTask(clap, FEATS.n_frames, FEATS.n_mels)
    model = Denoiser(TINY_DIT, FEATS.n_mels, clap.dim)
    data = StepBatches(TrackDataset(store, df, split_rows(df, "train")), 16, seed=0)
    return model, task, data


def _fixed_loss(model, task, batch, mask_padding=False):
    t, noise = draw_noise(batch["track_id"], range(4), task.latent_shape, seed=1)
    with torch.no_grad():
        return loss_at_draws(task, model, batch, t, noise, mask_padding)


def test_groups_nonempty_nested_and_to_k_gets_gradient(corpus):
    _, df, store = corpus
    model, task, data = _tiny((df, store))
    groups = {g: set(task.parameter_names(model, g)) for g in PARAM_GROUPS}
    assert all(groups.values())
    assert groups["cross_attn_kv"] < groups["cross_attn"] < groups["transformer"] < groups["all"]
    assert not groups["cross_attn"] & groups["self_attn"]
    batch = data(0)
    t, noise = draw_noise(batch["track_id"], [0], task.latent_shape)
    loss_at_draws(task, model, batch, t, noise).mean().backward()
    params = dict(model.named_parameters())
    for name in groups["cross_attn_kv"]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert count_parameters(model) > 0


def test_audio_conditioning_mode(corpus):
    _, df, store = corpus
    _, task, data = _tiny((df, store))
    model = Denoiser(TINY_DIT.replace(condition="audio"), FEATS.n_mels, task.clap.dim)
    batch = data(0)
    t, noise = draw_noise(batch["track_id"], [0], task.latent_shape)
    loss = loss_at_draws(task, model, batch, t, noise)
    loss.mean().backward()
    assert loss.shape == (16,) and model.words is None
    assert model.dit.transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0


def test_loss_is_deterministic_and_batch_independent(corpus):
    _, df, store = corpus
    model, task, data = _tiny((df, store))
    batch = data(0)
    a, b = _fixed_loss(model, task, batch), _fixed_loss(model, task, batch)
    assert torch.equal(a, b)
    one = _fixed_loss(model, task, {k: v[:1] for k, v in batch.items()})
    assert torch.allclose(one, a[:1], atol=1e-5)
    masked = _fixed_loss(model, task, batch, mask_padding=True)
    short = batch["mask"].sum(1) < batch["mask"].shape[1]
    assert torch.allclose(masked[~short], a[~short], atol=1e-6)
    dropped = dict(batch, drop_cond=torch.ones(len(batch["caption"]), dtype=torch.bool))
    assert not torch.allclose(_fixed_loss(model, task, dropped), a)


def test_training_rows_exclude_and_duplicate(corpus):
    _, df, _ = corpus
    rows = training_rows(df, TrainSettings(exclude=("aldo-1",), duplicate=(("bea-2", 3),)))
    ids = df["track_id"].to_numpy()[rows].tolist()
    assert "aldo-1" not in ids and ids.count("bea-2") == 3
    with pytest.raises(LinernotesError, match="not in the manifest"):
        training_rows(df, TrainSettings(exclude=("nope",)))
    assert TrainSettings.from_dict(
        json.loads(json.dumps(TrainSettings(duplicate=(("bea-2", 3),)).to_dict()))
    ).duplicate == (("bea-2", 3),)


def test_fit_lowers_loss(corpus):
    _, df, store = corpus
    model, task, data = _tiny((df, store))
    batch = data(0)
    before = _fixed_loss(model, task, batch).mean()
    s = TrainSettings(steps=25, batch_size=16, lr=3e-3, warmup=5, ema_decay=0.0)
    fit(model, data, DiffusionLoss(seed=0), s, task=task, progress=False)
    after = _fixed_loss(model, task, batch).mean()
    assert after < 0.8 * before


def test_resume_after_kill_is_identical(corpus, tmp_path):
    _, df, store = corpus
    s = TrainSettings(steps=6, batch_size=8, lr=2e-3, warmup=2, checkpoint_every=3)

    def run_fit(out, stop_at=None):
        model, task, data = _tiny((df, store))

        def stop(step, loss):
            if step == stop_at:
                raise KeyboardInterrupt  # a kill after the step-3 checkpoint
            return False

        res = fit(
            model,
            data,
            DiffusionLoss(seed=0),
            s,
            out_dir=out,
            task=task,
            key="k",
            should_stop=stop,
            progress=False,
        )
        return model, res

    ref_model, ref = run_fit(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "b", stop_at=4)
    model, res = run_fit(tmp_path / "b")
    assert res.steps == 6 and len(res.losses) == 3
    for (name, p), q in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    for name in ref.ema:
        assert torch.allclose(ref.ema[name], res.ema[name], atol=1e-6), name
    log = [json.loads(x) for x in (tmp_path / "b" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    with pytest.raises(LinernotesError, match="other settings"):
        fit(
            *_tiny((df, store))[:1],
            _tiny((df, store))[2],
            DiffusionLoss(),
            s.replace(lr=1e-3),
            out_dir=tmp_path / "b",
            task=_tiny((df, store))[1],
            key="k",
            progress=False,
        )


def test_clap_beats_chance(corpus, clap_dir):
    _, df, store = corpus
    from linernotes.models.clap import load_clap

    clap = load_clap(clap_dir)
    m = evaluate_clap(clap, store, df, "holdout")
    assert m["t2a_r1"] > 3 * m["t2a_r1_chance"] and m["a2t_r1"] > 3 * m["a2t_r1_chance"]
    assert m["artist_acc"] > 2 * m["artist_chance"]
    emb = clap.embed_audio(
        torch.from_numpy(store.features(0))[None], torch.from_numpy(np.array(store.mask[0]))[None]
    )
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1))


def test_run_save_load_and_checks(corpus, run, tmp_path):
    path, df, store = corpus
    again = load_run(run.path, manifest=path)
    batch = StepBatches(TrackDataset(store, df, split_rows(df, "train")), 8)(0)
    assert torch.equal(
        _fixed_loss(run.model, run.task, batch), _fixed_loss(again.model, again.task, batch)
    )
    assert again.hash == run.hash and run.config["steps"] == 20
    assert not (run.path / "checkpoint.pt").exists()
    other = df.copy()
    other.loc[0, "caption"] = "something else"
    with pytest.raises(LinernotesError, match="different manifest"):
        load_run(run.path, manifest=other)
    with pytest.raises(LinernotesError, match="feature settings"):  # resuming with others
        train(path, run.path, TrainSettings.from_dict(run.config["train"]), TINY_DIT,
              FEATS.replace(n_mels=16), progress=False)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(run.path, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LinernotesError, match="corrupt"):
        load_run(broken)
    with pytest.raises(LinernotesError, match="No trained run"):
        load_run(tmp_path / "nothing")
    copied = copy.deepcopy(run.model)  # cheap: frozen encoders live in the Task
    with torch.no_grad():
        copied.dit.proj_out.weight.mul_(0.5)
    derived = run.derive(copied, tmp_path / "derived", {"method": "test"})
    assert derived.config["parent"] == run.hash and derived.hash != run.hash
    assert not torch.equal(
        _fixed_loss(derived.model, derived.task, batch), _fixed_loss(run.model, run.task, batch)
    )


def test_generate_writes_wav_sidecar_and_latent(run, tmp_path):
    s = GenerateSettings(steps=4, guidance=2.0, seconds=1.5, griffin_lim_iters=4)
    paths = generate(
        run,
        ["a flute piece by Bea", "a choir piece by Fay"],
        tmp_path,
        seeds=7,
        settings=s,
        progress=False,
    )
    assert len(paths) == 2
    audio, sr = sf.read(paths[0])
    assert sr == FEATS.sample_rate and len(audio) == int(1.5 * sr) and np.isfinite(audio).all()
    clip = load_clip(paths[0], run=run)
    meta = json.loads(paths[0].with_suffix(".json").read_text())
    assert clip.prompt == "a flute piece by Bea" and meta["seed"] == 7 and meta["steps"] == 4
    assert int(clip.mask.sum()) == meta["n_real_frames"] == 24
    assert torch.equal(clip.latent, torch.from_numpy(np.load(paths[0].with_suffix(".npy"))))
    assert torch.equal(clip.latent[24:], clip.latent[-1:].expand(8, -1))  # silenced padding
    again = generate(
        run, ["a flute piece by Bea"], tmp_path / "again", seeds=[7], settings=s, progress=False
    )
    assert torch.allclose(load_clip(again[0]).latent, clip.latent, atol=1e-5)
    batch = clip_batch([clip, load_clip(paths[1])])
    t, noise = draw_noise(batch["track_id"], range(2), run.task.latent_shape)
    assert loss_at_draws(run.task, run.model, batch, t, noise, mask_padding=True).shape == (2,)


def test_laion_clap_tiny_random(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        PreTrainedTokenizerFast,
    )

    from linernotes.models.clap import LaionClapEncoder

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "music", "by", "bach"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(tmp_path)
    text = ClapTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        projection_dim=16,
        max_position_embeddings=40,
    )
    audio = ClapAudioConfig(
        window_size=4,
        num_mel_bins=16,
        spec_size=64,
        patch_size=2,
        patch_stride=2,
        hidden_size=32,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        patch_embeds_hidden_size=16,
        projection_dim=16,
    )
    torch.manual_seed(0)
    ClapModel(
        ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    ).save_pretrained(tmp_path)
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=16000, max_length_s=1, truncation="rand_trunc"
    ).save_pretrained(tmp_path)
    enc = LaionClapEncoder(tmp_path)
    t = enc.embed_text(["music by bach", "music"])
    a = enc.embed_waveforms([_tone(220, (1,), 0.5, 2), _tone(330, (1,), 0.7, 3)], SR)
    assert t.shape == a.shape == (2, 16)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    x = torch.randn(2, FEATS.n_frames, FEATS.n_mels)
    mask = torch.arange(FEATS.n_frames)[None] < torch.tensor([[32], [20]])
    stats = FeatureStats(np.full(FEATS.n_mels, -40.0, np.float32), np.full(FEATS.n_mels, 10.0))
    a = LaionClapEncoder(tmp_path, FEATS, stats, n_iter=2).embed_audio(x, mask)
    assert a.shape == (2, 16)
    with pytest.raises(LinernotesError, match="No LAION-CLAP"):
        LaionClapEncoder(tmp_path / "missing")


def test_caches_filled_in_inference_mode_serve_gradients(corpus):
    """Scoring under inference_mode first (attribution's baseline), then a gradient (unlearning)
    on a fresh model: the rotary and caption caches must not hold inference tensors."""
    _, df, store = corpus
    model, task, data = _tiny((df, store))
    batch = data(0)
    t, noise = draw_noise(batch["track_id"], [0], task.latent_shape, seed=3)
    with torch.inference_mode():
        task.per_sample_loss(model, batch, t[:, 0], noise[:, 0])
    loss = task.per_sample_loss(model, batch, t[:, 0], noise[:, 0]).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
    assert len(grads) > len(params) // 2 and all(torch.isfinite(g).all() for g in grads)


def test_log_seconds_leaves_out_the_pause_of_a_resumed_run(tmp_path):
    import json

    from linernotes.training import log_seconds

    times = [0.0, 1.0, 2.0, 3.0, 1000.0, 1001.0]  # killed after step 3, resumed much later
    log = tmp_path / "losses.jsonl"
    log.write_text("".join(json.dumps({"step": i, "time": x}) + "\n" for i, x in enumerate(times)))
    assert log_seconds(log) == pytest.approx(6.0)
