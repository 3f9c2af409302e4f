"""A real-shaped streaming voice-activity detector on synthetic 8 kHz audio (issue 24).

Data (deterministic from a seed, nothing downloaded): streams of 60 s at 8 kHz that alternate
background-only segments (white, pink or brown noise whose level wanders; some carry a mains
hum, tonal beeps or clicks) with "speech-like" segments (a sum of harmonics of a wandering
pitch under moving formant peaks, syllable-rate amplitude modulation, fricative noise bursts)
at a signal-to-noise ratio of -3 to 25 dB, plus stretches of digital silence (exactly zero
samples). Every stream ends with a zero-padded chunk and then whole chunks of zeros, as a
stream padded to a chunk multiple does. Cut into chunks of 256 samples (32 ms); a chunk is
speech when more than half its samples are.

Model (:class:`VADStream`, no BatchNorm): ``forward(x, state) -> (prob, state)`` with ``x``
``(B, 256)`` raw samples and ``state`` ``(B, 2, 128)`` (the LSTM cell's h and c): a fixed
Hann-windowed DFT (a buffer, not a weight) gives ``log1p(100 |X|)`` (129 bins; the magnitude
takes a 1e-12 floor so exact zeros are harmless), two Conv1d over frequency, two Linear layers,
an LSTMCell(128, 128) and a Linear + sigmoid: the chunk's speech probability ``(B,)``.

Trained with truncated backpropagation through windows of consecutive chunks, the state
carried across windows from the stream's start (as deployed), BCE on the chunk labels.
Cached in ``build/audio/vad.safetensors`` with a ``vad.json`` card; the data in
``build/audio/data-seed<seed>.npz``.

Run: ``python tools/audio_stream.py`` (builds or loads, prints the card). Threads: torch 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "audio"
SR = 8000
CHUNK = 256  # 32 ms
STREAM_S = 60.0
STREAM_CHUNKS = int(STREAM_S * SR) // CHUNK  # 1,875
TRAIN_STREAMS = 128
TEST_STREAMS = 4
HIDDEN = 128
FRONT_GAIN = 100.0
DATA_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _smooth_walk(rng: np.random.Generator, n: int, step: float, knots: int) -> np.ndarray:
    """A slowly wandering curve of ``n`` samples: a random walk on ``knots`` points."""
    k = max(2, knots)
    walk = np.cumsum(rng.normal(0.0, step, k))
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), walk)


def _noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-RMS white, pink (-3 dB/oct) or brown (-6 dB/oct) noise."""
    w = rng.standard_normal(n)
    if kind == "white":
        out = w
    else:
        spec = np.fft.rfft(w)
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        spec = spec / (np.sqrt(f) if kind == "pink" else f)
        out = np.fft.irfft(spec, n)
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def _speech(rng: np.random.Generator, n: int) -> np.ndarray:
    """A speech-like segment of ``n`` samples, unit RMS over its voiced parts."""
    t = np.arange(n) / SR
    # Syllables: 120-350 ms bumps with short gaps; each with its own formants and voicing.
    env = np.zeros(n)
    amps = []  # (start, stop, formants, voiced, fricative)
    pos = int(rng.uniform(0, 0.05) * SR)
    while pos < n:
        dur = int(rng.uniform(0.12, 0.35) * SR)
        stop = min(n, pos + dur)
        if stop - pos > 16:
            bump = np.sin(np.linspace(0, math.pi, stop - pos)) ** rng.uniform(0.5, 1.5)
            env[pos:stop] = bump * rng.uniform(0.4, 1.0)
            formants = (rng.uniform(300, 900), rng.uniform(900, 2400), rng.uniform(2300, 3500))
            amps.append((pos, stop, formants, rng.random() < 0.9, rng.random() < 0.3))
        pos = stop + int(rng.uniform(0.0, 0.12) * SR)
    base = rng.uniform(85, 260)
    f0 = base * np.exp(
        0.12 * np.sin(2 * math.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 6.3))
        + _smooth_walk(rng, n, 0.04, int(n / SR * 8) + 2)
    )
    phase = 2 * math.pi * np.cumsum(f0) / SR
    voiced = np.zeros(n)
    k_max = int(3800 / base)
    for start, stop, (f1, f2, f3), is_voiced, _ in amps:
        if not is_voiced:
            continue
        seg = slice(start, stop)
        harm = np.zeros(stop - start)
        f0_seg = f0[seg]
        for k in range(1, k_max + 1):
            fk = k * f0_seg
            gain = (
                np.exp(-(((fk - f1) / 120) ** 2))
                + 0.7 * np.exp(-(((fk - f2) / 180) ** 2))
                + 0.4 * np.exp(-(((fk - f3) / 250) ** 2))
                + 0.05 / k
            ) * (fk < 3900)
            harm += gain * np.sin(k * phase[seg])
        voiced[seg] = harm
    voiced /= np.sqrt(np.mean(voiced[env > 0.1] ** 2)) + 1e-9 if np.any(env > 0.1) else 1.0
    out = voiced * env
    # Fricative bursts: high-passed noise at the start of some syllables.
    for start, stop, _, is_voiced, fric in amps:
        if fric or not is_voiced:
            m = min(stop - start, int(rng.uniform(0.04, 0.12) * SR))
            burst = np.diff(rng.standard_normal(m + 1)) * np.hanning(m) * rng.uniform(0.2, 0.6)
            out[start : start + m] += burst
    return out


def make_stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream: samples ``(STREAM_CHUNKS * CHUNK,)`` float32 and per-sample labels (0/1).

    The audio stops 0.5-1.5 s before the end (not at a chunk boundary); the rest is zeros.
    """
    rng = np.random.default_rng(seed)
    total = STREAM_CHUNKS * CHUNK
    audio_len = total - int(rng.uniform(0.5, 1.5) * SR) - int(rng.integers(1, CHUNK))
    x = np.zeros(total)
    label = np.zeros(total, dtype=np.int8)
    kind = ["white", "pink", "brown"][int(rng.integers(0, 3))]
    noise_db = -45 + 12 * rng.random() + 6 * _smooth_walk(rng, audio_len, 1.0, 12)
    bg = _noise(rng, audio_len, kind) * 10 ** (noise_db / 20)
    hum = rng.random() < 0.4
    if hum:
        t = np.arange(audio_len) / SR
        mains = 50.0 if rng.random() < 0.5 else 60.0
        bg += sum(
            10 ** ((noise_db - rng.uniform(0, 10)) / 20) / h * np.sin(2 * math.pi * mains * h * t)
            for h in (1, 2, 3, 5)
        )
    x[:audio_len] = bg
    pos = 0
    speaking = rng.random() < 0.5
    while pos < audio_len:
        if speaking:
            n = int(rng.uniform(0.4, 3.5) * SR)
            n = min(n, audio_len - pos)
            if n > 64:
                snr = rng.uniform(-3, 25)
                level = 10 ** ((float(noise_db[pos]) + snr) / 20)
                x[pos : pos + n] += _speech(rng, n) * level
                label[pos : pos + n] = 1
        else:
            n = int(rng.uniform(0.3, 2.5) * SR)
            n = min(n, audio_len - pos)
            level = 10 ** ((float(noise_db[pos]) + rng.uniform(0, 15)) / 20)
            r = rng.random()
            if r < 0.15 and n > 0.2 * SR:  # tonal beep (not speech)
                m = min(n, int(rng.uniform(0.1, 0.4) * SR))
                s = pos + int(rng.integers(0, n - m + 1))
                f = rng.uniform(400, 2500)
                x[s : s + m] += level * np.sin(2 * math.pi * f * np.arange(m) / SR)
            elif r < 0.3:  # clicks
                for s in pos + rng.integers(0, n, size=int(rng.integers(1, 6))):
                    x[s : s + 20] += level * 3 * np.exp(-np.arange(min(20, total - s)) / 4)
            elif r < 0.38 and n >= 4 * CHUNK:  # digital silence: whole chunks of exact zeros
                a = (pos + CHUNK - 1) // CHUNK * CHUNK
                b = (pos + n) // CHUNK * CHUNK
                x[a:b] = 0.0
        pos += n
        speaking = not speaking
    x[audio_len:] = 0.0
    label[audio_len:] = 0
    gain = 10 ** rng.uniform(-0.5, 0.5)  # recording level
    return (x * gain).astype(np.float32), label


def chunk_labels(label: np.ndarray) -> np.ndarray:
    """Chunk label: more than half the chunk's samples are speech."""
    return (label.reshape(-1, CHUNK).mean(1) > 0.5).astype(np.float32)


@dataclass
class AudioData:
    """Chunked streams: ``x`` (streams, chunks, 256) float32 and ``y`` (streams, chunks)."""

    x: torch.Tensor
    y: torch.Tensor


def load_data(seed: int = 0, cache: Path = CACHE) -> tuple[AudioData, AudioData]:
    """Training and held-out streams (built once, cached in ``build/audio/data-seed<seed>.npz``)."""
    path = cache / f"data-seed{seed}.npz"
    if path.exists():
        z = np.load(path)
        if int(z["version"]) == DATA_VERSION:
            return (
                AudioData(torch.from_numpy(z["x_train"]), torch.from_numpy(z["y_train"])),
                AudioData(torch.from_numpy(z["x_test"]), torch.from_numpy(z["y_test"])),
            )
    out = {}
    for split, count, offset in (("train", TRAIN_STREAMS, 0), ("test", TEST_STREAMS, 10_000)):
        xs, ys = [], []
        for i in range(count):
            x, lab = make_stream(seed * 100_000 + offset + i)
            xs.append(x.reshape(STREAM_CHUNKS, CHUNK))
            ys.append(chunk_labels(lab))
        out[f"x_{split}"], out[f"y_{split}"] = np.stack(xs), np.stack(ys)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, version=DATA_VERSION, **out)
    return (
        AudioData(torch.from_numpy(out["x_train"]), torch.from_numpy(out["y_train"])),
        AudioData(torch.from_numpy(out["x_test"]), torch.from_numpy(out["y_test"])),
    )


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class VADStream(nn.Module):
    """Streaming voice-activity detector: DFT front end, Conv1d + Linear, LSTMCell, sigmoid."""

    def __init__(self, hidden: int = HIDDEN, channels: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        bins = CHUNK // 2 + 1
        n = torch.arange(CHUNK, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64)
        ang = 2 * math.pi * n[:, None] * k[None, :] / CHUNK
        window = torch.hann_window(CHUNK, periodic=True, dtype=torch.float64)[:, None]
        # (256, 2 * 129): windowed cos | sin; a fixed transform, not a weight.
        basis = torch.cat([window * torch.cos(ang), -window * torch.sin(ang)], 1).float()
        self.register_buffer("dft", basis, persistent=False)
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 5, stride=2, padding=2)
        self.fc1 = nn.Linear(channels * ((bins + 1) // 2), 256)
        self.fc2 = nn.Linear(256, 128)
        self.cell = nn.LSTMCell(128, hidden)
        self.head = nn.Linear(hidden, 1)

    def initial_state(self, batch: int) -> torch.Tensor:
        """The zero state ``(batch, 2, hidden)`` a stream starts from."""
        return torch.zeros(batch, 2, self.hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-chunk features ``(N, 128)`` of raw chunks ``(N, 256)``."""
        spec = x @ self.dft
        re, im = spec.chunk(2, dim=-1)
        mag = torch.sqrt(re * re + im * im + 1e-12)  # floor: exact zeros give finite grads
        z = torch.log1p(FRONT_GAIN * mag).unsqueeze(1)  # (N, 1, 129)
        z = F.relu(self.conv1(z))
        z = F.relu(self.conv2(z)).flatten(1)
        return F.relu(self.fc2(F.relu(self.fc1(z))))

    def step(self, feat: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step on features: the logit ``(B,)`` and the new state."""
        h, c = self.cell(feat, (state[:, 0], state[:, 1]))
        return self.head(h).squeeze(-1), torch.stack([h, c], 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech probability ``(B,)`` of chunks ``x`` ``(B, 256)``, and the new state."""
        logit, new = self.step(self.features(x), state)
        return torch.sigmoid(logit), new


def weights(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def run_stream(model: VADStream, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Free-running over streams ``x`` (S, T, 256) from the zero state: probabilities (S, T)
    and the state before each chunk (S, T, 2, hidden)."""
    s, t = x.shape[:2]
    feats = model.features(x.reshape(s * t, CHUNK)).reshape(s, t, -1)
    state = model.initial_state(s)
    probs, states = [], []
    for i in range(t):
        states.append(state)
        logit, state = model.step(feats[:, i], state)
        probs.append(torch.sigmoid(logit))
    return torch.stack(probs, 1), torch.stack(states, 1)


def train(
    model: VADStream,
    data: AudioData,
    test: AudioData,
    *,
    epochs: int,
    window: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
) -> dict[str, float]:
    """Truncated BPTT over windows of consecutive chunks, the state carried across windows."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    x, y = data.x, data.y
    s, t = y.shape
    n_windows = t // window
    total = epochs * n_windows
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        model.train()
        state = model.initial_state(s)
        # A random start offset per epoch so windows fall at different places; the first
        # `off` chunks are run without gradient to carry the state as deployed.
        off = int(torch.randint(0, window, (1,), generator=gen))
        if off:
            with torch.no_grad():
                f = model.features(x[:, :off].reshape(-1, CHUNK)).reshape(s, off, -1)
                for i in range(off):
                    state = model.step(f[:, i], state)[1]
        losses = []
        for w in range(n_windows):
            a = off + w * window
            b = min(t, a + window)
            if b <= a:
                break
            f = model.features(x[:, a:b].reshape(-1, CHUNK)).reshape(s, b - a, -1)
            logits = []
            for i in range(b - a):
                logit, state = model.step(f[:, i], state)
                logits.append(logit)
            loss = F.binary_cross_entropy_with_logits(torch.stack(logits, 1), y[:, a:b])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step < total - 1:
                sched.step()
            step += 1
            state = state.detach()
            losses.append(loss.item())
        model.eval()
        acc = accuracy(model, test)
        log(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, held-out acc {acc:.4f}")
    return {"train_acc": accuracy(model, data), "test_acc": accuracy(model, test)}


@torch.no_grad()
def accuracy(model: VADStream, data: AudioData) -> float:
    """Per-chunk accuracy, free-running from the zero state over each whole stream."""
    probs, _ = run_stream(model, data.x)
    return float(((probs > 0.5).float() == data.y).float().mean())


def load_model(seed: int = 0, epochs: int = 24, cache: Path = CACHE, log=print) -> VADStream:
    """The trained detector (trained once and cached with a JSON card)."""
    torch.set_num_threads(1)
    paths = cache / "vad.safetensors", cache / "vad.json"
    model = VADStream()
    if all(p.exists() for p in paths):
        card = json.loads(paths[1].read_text())
        if card.get("seed") == seed and card.get("data_version") == DATA_VERSION:
            model.load_state_dict(load_file(paths[0]))
            return model.eval()
    train_data, test_data = load_data(seed, cache)
    torch.manual_seed(seed)
    model = VADStream()
    t0 = time.perf_counter()
    res = train(model, train_data, test_data, epochs=epochs, seed=seed, log=log)
    elapsed = time.perf_counter() - t0
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[0])
    card = {
        "model": "VADStream",
        "architecture": (
            "x (B,256) raw 8 kHz samples -> Hann DFT (fixed buffer) -> log1p(100|X|) (129 "
            "bins) -> Conv1d(1,16,5)+ReLU -> Conv1d(16,16,5,stride 2)+ReLU -> Linear(1040,256)"
            "+ReLU -> Linear(256,128)+ReLU -> LSTMCell(128,128) -> Linear(128,1) -> sigmoid; "
            "state (B,2,128) = (h, c)"
        ),
        "weights": weights(model),
        "seed": seed,
        "data_version": DATA_VERSION,
        "sample_rate": SR,
        "chunk": CHUNK,
        "stream_chunks": STREAM_CHUNKS,
        "train_streams": TRAIN_STREAMS,
        "test_streams": TEST_STREAMS,
        "epochs": epochs,
        "train_s": round(elapsed, 1),
        "threads": torch.get_num_threads(),
        "train_acc": res["train_acc"],
        "test_acc": res["test_acc"],
        "test_speech_fraction": float(test_data.y.mean()),
        "sha256": hashlib.sha256(paths[0].read_bytes()).hexdigest(),
    }
    paths[1].write_text(json.dumps(card, indent=1) + "\n")
    log(json.dumps(card, indent=1))
    return model


def main(argv: list[str] | None = None) -> int:
    """Build (or load) the data and the model; print the card."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    load_data(args.seed)
    print(f"data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    load_model(args.seed, args.epochs, log=lambda s: print(s, flush=True))
    print((CACHE / "vad.json").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
