"""A sentence-embedding BERT of real size: QT step against a plain distillation step.

Issue 25 asks for a BERT-style sentence-embedding folder (tens of millions of weights, two
inputs) compressed with one command within 45 minutes on 2 cores. No pretrained folder can be
downloaded here, so the model is built from a MiniLM-L6-sized ``BertConfig`` (hidden 384, 6
layers, 12 heads, intermediate 1,536, vocabulary 30,522: 22.7M weights) with seeded random
weights, wrapped as the CLI wraps a sentence-transformers folder (mean pooling over the
attention mask, :func:`qtcompress.data.pooling.pooled`). Timing does not depend on the weights'
values; fidelity on random weights says little about a pretrained model and is not reported.

Measured, interleaved over rounds, batch 64 of 32 tokens:

* ``plain``: one distillation step of a dense copy of the model (AdamW on all 22.7M weights,
  cosine loss against the teacher's pooled embedding);
* ``qt``: one step of :meth:`QTModel.finetune` at the default generator (hashed, 0.5% of M),
  as the pipeline runs it (the teacher's outputs computed once, before the loop);

and what the default 1,500 fine-tuning steps would take at that rate.

``--varied``: the data as a sentence file gives it instead: lengths drawn from 8 to 48 tokens,
padded (as the text loader pads) to the data set's longest example, 128 tokens; both steps
measured with and without the pooled wrapper dropping each batch's trailing padding
(:func:`qtcompress.data.pooling.trim_padding`). Writes its own section.

``--end-to-end``: the one command a user runs. The same model saved as a sentence-transformers
folder (``save_pretrained``, a WordPiece vocabulary of 30,522 made-up words, mean pooling in
``1_Pooling/config.json``) and a sentence file of made-up sentences (6 to 40 words) under
``build/hf_e2e/``; then ``qtcompress compress FOLDER --data sentences.txt`` and nothing else,
its stderr on a terminal (a pty) so the progress bars draw as for a user; wall time, the
phases' times from ``summary.json``, the longest silence on stderr and the file sizes. Writes
its own section.

Run: ``python tools/bench_hf.py`` (writes its section of docs/benchmarks.md). Threads:
``--threads`` (default 2) for torch, BLAS and qsim.
"""

from __future__ import annotations

import os
import sys

THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section  # noqa: E402

from qtcompress import QTConfig, compress  # noqa: E402
from qtcompress.data.pooling import pooled  # noqa: E402
from qtcompress.qnn.backends import set_threads  # noqa: E402

BATCH, TOKENS, DEFAULT_STEPS = 64, 32, 1500


def build(seed: int = 0) -> torch.nn.Module:
    """The MiniLM-L6-sized BERT with mean pooling, random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    return pooled(BertModel(config).eval(), "mean")


def inputs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` token sequences of ``TOKENS`` with a few padded tails."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, TOKENS), generator=g)
    lengths = torch.randint(TOKENS // 2, TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(TOKENS)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def varied_inputs(n: int, seed: int = 0, width: int = 128) -> dict[str, torch.Tensor]:
    """``n`` sentences of 8 to 48 tokens padded to ``width`` (one example reaches it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, width), generator=g)
    lengths = torch.randint(8, 49, (n,), generator=g)
    lengths[n // 2] = width  # the data set's longest line sets the padded width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def plain_steps(teacher: torch.nn.Module, student: torch.nn.Module, opt, data, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per plain distillation step (teacher forward, student forward/backward, AdamW)."""
    t0 = time.perf_counter()
    for k in range(steps):
        idx = slice((k * BATCH) % (len(data["input_ids"]) - BATCH), None)
        batch = {n: v[idx][:BATCH] for n, v in data.items()}
        with torch.no_grad():
            target = teacher(**batch)
        out = student(**batch)
        loss = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def qt_steps(qt: Any, data: dict[str, torch.Tensor], steps: int) -> float:
    """Seconds per :meth:`QTModel.finetune` step, step to step from the loop's own callback.

    The call's set-up (probe batch, the teacher's outputs) is paid once per run, not per step.
    """
    stamps: list[float] = []
    qt.finetune(
        data,
        steps=steps + 1,
        batch_size=BATCH,
        progress=False,
        callback=lambda _s, _l: stamps.append(time.perf_counter()),
    )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main(argv: list[str] | None = None) -> int:
    """Measure and write the section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per round and arm")
    ap.add_argument("--varied", action="store_true", help="sentence lengths 8-48 in width 128")
    ap.add_argument("--end-to-end", action="store_true", help="time the whole CLI command")
    ap.add_argument("--sentences", type=int, default=5000, help="lines of the sentence file")
    ap.add_argument(
        "--finetune-steps", type=int, default=None, help="end to end with fewer steps (not written)"
    )
    args = ap.parse_args(argv)
    if args.varied:
        return varied(args)
    if args.end_to_end:
        return end_to_end(args)
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    warnings.simplefilter("ignore")
    model = build()
    weights = sum(p.numel() for p in model.parameters())
    data = inputs(1024)
    t0 = time.perf_counter()
    qt = compress(model, QTConfig())
    compress_s = time.perf_counter() - t0
    rep = qt.report()
    t0 = time.perf_counter()
    qt.fit_weights(steps=100, progress=False)
    fit_s = time.perf_counter() - t0
    student = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    plain, qts = [], []
    for _ in range(args.rounds):  # interleaved: the machine's load hits both arms alike
        plain.append(plain_steps(model, student, opt, data, args.steps))
        qts.append(qt_steps(qt, data, args.steps))
    p, q = statistics.median(plain), statistics.median(qts)
    md = "\n".join(
        [
            f"Measured {machine()}; `python tools/bench_hf.py`, {args.threads} threads, batch "
            f"{BATCH} of {TOKENS} tokens, median of {args.rounds} interleaved rounds of "
            f"{args.steps} steps. The model: a MiniLM-L6-sized `BertModel` built from its config "
            f"with random weights ({weights:,} weights), mean-pooled over the attention mask as "
            "the CLI does for a sentence-transformers folder. The QT step is "
            "`QTModel.finetune`'s (the teacher's outputs computed once before the loop, as for "
            "any in-memory data) at the default generator: "
            f"{rep.trainable:,} parameters ({rep.trainable / weights:.2%} of M; "
            f"{rep.n_qubits} qubits x {rep.n_layers} layers).",
            "",
            "| | seconds |",
            "|---|---|",
            f"| `compress()` (build the generator) | {compress_s:.1f} |",
            f"| phase 1, 100 steps | {fit_s:.1f} |",
            f"| plain distillation step | {p:.3f} |",
            f"| QT step | {q:.3f} ({q / p:.2f}x the plain step) |",
            f"| the default {DEFAULT_STEPS:,} QT steps at that rate | {DEFAULT_STEPS * q:.0f} "
            f"({DEFAULT_STEPS * q / 60:.1f} min) |",
        ]
    )
    print(md)
    write_section("bench_hf", "A sentence-embedding BERT of real size (bench_hf.py)", md)
    return 0


def varied(args: argparse.Namespace) -> int:
    """Steps with and without dropping trailing padding, on varied sentence lengths."""
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    warnings.simplefilter("ignore")
    model = build()
    data = varied_inputs(1024)
    qt = compress(model, QTConfig())
    student = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: the machine's load hits every arm alike
        for trim in (True, False):
            for m in (model, student, qt.functional.module):
                m.trim = trim  # type: ignore[assignment]
            times.setdefault(("plain", trim), []).append(
                plain_steps(model, student, opt, data, args.steps)
            )
            times.setdefault(("qt", trim), []).append(qt_steps(qt, data, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for arm, label in (("plain", "plain distillation step"), ("qt", "QT step")):
        full, cut = med[(arm, False)], med[(arm, True)]
        rows.append(
            f"| {label} | {full:.3f} | {cut:.3f} | {full / cut:.2f}x | "
            f"{DEFAULT_STEPS * cut / 60:.1f} min |"
        )
    md = "\n".join(
        [
            f"Measured {machine()}; `python tools/bench_hf.py --varied`, {args.threads} "
            f"threads, batch {BATCH}, median of {args.rounds} interleaved rounds of "
            f"{args.steps} steps. The MiniLM-L6-sized mean-pooled `BertModel` above on 1,024 "
            "sentences of 8 to 48 tokens padded to the data set's longest, 128 tokens (as the "
            "text loader pads a sentence file). Padded: every batch runs at 128 tokens; "
            "trimmed: the pooled wrapper drops the columns past the batch's longest sentence "
            "(the default since 2026-12-05; the embedding is the same within float rounding).",
            "",
            "| step | padded (s) | trimmed (s) | speed-up | 1,500 steps at the trimmed rate |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(md)
    write_section(
        "bench_hf_padding", "Trailing padding dropped per batch (bench_hf.py --varied)", md
    )
    return 0


def _word(i: int) -> str:
    """The ``i``-th made-up word: letters only, so WordPiece keeps it whole."""
    letters = ""
    i += 26 * 26  # at least three letters
    while i:
        i, r = divmod(i, 26)
        letters += chr(ord("a") + r)
    return letters


def write_folder(root: Path, n_sentences: int, seed: int = 0) -> tuple[Path, Path]:
    """The MiniLM-sized folder (sentence-transformers, mean pooling) and a sentence file."""
    import json
    import random

    from transformers import BertTokenizerFast

    folder, sentences = root / "minilm-random", root / "sentences.txt"
    model = build(seed).model
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [_word(i) for i in range(model.config.vocab_size - len(specials))]
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(specials + words) + "\n")
        BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
        model.save_pretrained(str(folder))
        modules = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"}]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    rng = random.Random(seed)
    lines = (" ".join(rng.choices(words, k=rng.randint(6, 40))) for _ in range(n_sentences))
    sentences.write_text("\n".join(lines) + "\n")
    return folder, sentences


def run_on_a_terminal(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Run ``cmd`` with stderr on a pty: (wall s, longest stderr silence s, rc, stderr tail)."""
    import fcntl
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    # A new pty is 0 x 0 characters: progress bars fit their width to it and draw nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    t0 = time.perf_counter()
    # stdout (the summary table) is not read: summary.json holds the same figures.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    last, gap, chunks, before = t0, 0.0, [], ""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        now = time.perf_counter()
        if now - last > gap:  # the longest silence so far: say what came before it
            said = b"".join(chunks[-4:]).decode("utf-8", "replace").replace("\r", "\n")
            before = ([line for line in said.splitlines() if line.strip()] or [""])[-1]
        gap, last = max(gap, now - last), now
        chunks.append(chunk)
    print(f"longest silence {gap:.0f} s, after: {before.strip()[:160]}")
    proc.wait()
    wall = time.perf_counter() - t0
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r", "\n")
    tail = "\n".join(line for line in text.splitlines() if line.strip())[-2000:]
    return wall, max(gap, wall - (last - t0)), proc.returncode, tail


def end_to_end(args: argparse.Namespace) -> int:
    """Time ``qtcompress compress FOLDER --data sentences.txt`` as a user runs it."""
    import json

    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[1] / "build" / "hf_e2e"
    folder, sentences = write_folder(root, args.sentences)
    out = root / "out"
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    script = str(Path(sys.executable).with_name("qtcompress"))  # the console script a user runs
    cmd = [script, "--threads", threads, "compress", str(folder), "--data", str(sentences)]
    cmd += ["-o", str(out)]
    if args.finetune_steps is not None:  # a short run: the silences outside the loop
        cmd += ["--finetune-steps", str(args.finetune_steps)]
    wall, silence, rc, tail = run_on_a_terminal(cmd, env)
    print(tail)
    if rc != 0:
        print(f"exit {rc}", file=sys.stderr)
        return 1
    summary = json.loads((out / "summary.json").read_text())
    p1, p2, total = summary["fit_s"], summary["finetune_s"], summary["total_s"]
    gen_bytes, weights_bytes = summary["generator_file_bytes"], summary["checkpoint_bytes"]
    md = "\n".join(
        [
            f"Measured {machine()}; `python tools/bench_hf.py --end-to-end`, {threads} threads. "
            f"The MiniLM-L6-sized BERT above with random weights saved as a sentence-transformers "
            f"folder (mean pooling), a file of {args.sentences:,} made-up sentences of 6 to 40 "
            "words, and the one command `qtcompress compress FOLDER --data sentences.txt` with "
            "no other option, its stderr on a terminal. Fidelity on random weights says "
            "little and is not reported.",
            "",
            "| | |",
            "|---|---|",
            f"| wall time, the whole command | {wall:.0f} s ({wall / 60:.1f} min) |",
            f"| phase 1 / phase 2 / pipeline total (summary.json) | {p1:.0f} s / {p2:.0f} s / "
            f"{total:.0f} s |",
            f"| generator | {summary['generator_params']:,} parameters, "
            f"{summary['n_qubits']} qubits x {summary['n_layers']} layers |",
            f"| longest stderr silence | {silence:.0f} s |",
            f"| weights / generator file bytes | {weights_bytes:,} / {gen_bytes:,} "
            f"({weights_bytes / gen_bytes:.0f}x) |",
        ]
    )
    print(md)
    if args.finetune_steps is not None:
        return 0  # not the one command: printed, not written
    write_section("bench_hf_e2e", "The one command on a BERT folder (bench_hf.py --end-to-end)", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
