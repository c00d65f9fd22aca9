"""Audio I/O: read any soundfile-readable file as float32 at a target rate (mono, or the channel
count a model expects); write FLAC/WAV."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from linernotes.artifacts import atomic_path
from linernotes.errors import LinernotesError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def load_audio(path: str | Path, sample_rate: int, channels: int | None = None) -> np.ndarray:
    """Read `path` resampled to `sample_rate`, float32 in [-1, 1]: mono (n,) by default, or
    (channels, n) with mono duplicated to stereo and stereo averaged to mono as needed."""
    audio, sr, _ = _read(Path(path))
    return _convert(audio, sr, sample_rate, channels)


#: A decode may fall this far short of the declared length (a fraction of it, or at least
#: `SHORT_DECODE_FRAMES`) without being reported: MP3 and Ogg lengths are not always exact.
SHORT_DECODE_FRACTION = 0.005
SHORT_DECODE_FRAMES = 4096
_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, segments


@dataclass(frozen=True)
class Decoded:
    """Audio as `load_audio` returns it, with how much of the file it is: the frames decoded and
    the frames the file declares (at the file's own rate), and whether an Ogg file ends with its
    end-of-stream page (a cut-off Ogg file declares only the pages it still has)."""

    audio: np.ndarray
    file_rate: int
    frames: int
    declared_frames: int
    ended: bool = True

    def shortfall(self) -> str:
        """'' if the whole file decoded; else what is missing, e.g. 'decoded 2.4 s of a declared
        10.0 s'."""
        got = self.frames / self.file_rate
        if not self.ended:
            return f"decoded {got:.1f} s and the Ogg stream stops without its end-of-stream page"
        declared, missing = self.declared_frames, self.declared_frames - self.frames
        if 0 < declared < 2**62 and missing > max(
            SHORT_DECODE_FRACTION * declared, SHORT_DECODE_FRAMES
        ):
            return f"decoded {got:.1f} s of a declared {declared / self.file_rate:.1f} s"
        return ""


def load_audio_checked(path: str | Path, sample_rate: int, channels: int | None = None) -> Decoded:
    """`load_audio`, plus the decoded and declared lengths, to tell a whole file from one that was
    cut off or has a corrupt stretch that the decoder skipped (see `Decoded.shortfall`)."""
    path = Path(path)
    audio, sr, info = _read(path)
    declared = _header_frames(path, info)
    return Decoded(
        audio=_convert(audio, sr, sample_rate, channels),
        file_rate=sr,
        frames=audio.shape[1],
        declared_frames=info.frames if declared is None else declared,
        ended=info.format != "OGG" or _ogg_ends(path),
    )


def _read(path: Path) -> tuple[np.ndarray, int, sf.SoundFile]:
    """(file channels, n) float32 audio, its sample rate and the (closed) soundfile handle, whose
    `frames` is the length libsndfile found in the header."""
    try:
        with sf.SoundFile(str(path)) as f:
            audio = f.read(dtype="float32", always_2d=True)
    except Exception as exc:
        raise LinernotesError(f"Cannot read audio file {path}: {exc}") from exc
    return audio.T, f.samplerate, f


def _convert(audio: np.ndarray, sr: int, sample_rate: int, channels: int | None) -> np.ndarray:
    if channels is None or channels != audio.shape[0]:
        audio = audio.mean(axis=0, keepdims=True)
        if channels is not None:
            audio = np.repeat(audio, channels, axis=0)
    if sr != sample_rate and audio.shape[1]:
        import librosa

        audio = librosa.resample(audio, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return audio[0] if channels is None else audio


def _header_frames(path: Path, info: sf.SoundFile) -> int | None:
    """Frames the header of a WAV (data chunk) or AIFF (COMM chunk) file declares, which
    libsndfile trims to the bytes present; None for other formats, compressed WAV or a header
    without a length (a stream)."""
    big = info.format == "AIFF"
    if info.format not in ("WAV", "WAVEX", "AIFF"):
        return None
    block = 0
    try:
        with open(path, "rb") as f:
            pos, end = 12, path.stat().st_size
            while pos + 8 <= end:
                f.seek(pos)
                cid, size = struct.unpack(">4sI" if big else "<4sI", f.read(8))
                if big and cid == b"COMM":
                    return struct.unpack(">hI", f.read(6))[1]
                if not big and cid == b"fmt ":
                    block = struct.unpack("<12xH", f.read(14))[0]
                if not big and cid == b"data":
                    pcm = info.subtype.startswith(("PCM_", "FLOAT", "DOUBLE", "ULAW", "ALAW"))
                    known = pcm and block and size not in (0, 0xFFFFFFFF)
                    return size // block if known else None
                pos += 8 + size + (size & 1)
    except (OSError, struct.error):
        return None
    return None


def _ogg_ends(path: Path) -> bool:
    """Whether an Ogg file ends with a whole page that carries the end-of-stream flag: a cut-off
    file does not (and libsndfile's length is then that of the pages left)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _OGG_MAX_PAGE))
        tail = f.read()
    i = tail.rfind(b"OggS")
    while i >= 0:
        header = tail[i : i + 27]
        if len(header) == 27 and header[4] == 0:
            segments = tail[i + 27 : i + 27 + header[26]]
            if len(segments) == header[26] and i + 27 + len(segments) + sum(segments) == len(tail):
                return bool(header[5] & 4)
        i = tail.rfind(b"OggS", 0, i)
    return False


def mono(audio: np.ndarray) -> np.ndarray:
    """(n,) audio as it is; (n, channels) averaged to (n,)."""
    audio = np.asarray(audio, np.float32)
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def loudness_normalise(audio: np.ndarray, target_rms_db: float = -20.0) -> np.ndarray:
    """Scale to a target RMS level (dBFS), then keep the peak below 0.99."""
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0
    if rms < 1e-8:
        return audio
    out = audio * (10 ** (target_rms_db / 20) / rms)
    peak = float(np.abs(out).max())
    if peak > 0.99:
        out = out * (0.99 / peak)
    return out.astype(np.float32)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write audio, (n,) mono or (n, channels), atomically; the format follows the suffix (.flac
    or .wav), 16-bit."""
    path = Path(path)
    fmt = {".flac": "FLAC", ".wav": "WAV"}.get(path.suffix.lower())
    if fmt is None:
        raise LinernotesError(f"Cannot write {path}: use a .flac or .wav name.")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1, 1), sample_rate, format=fmt, subtype="PCM_16")
