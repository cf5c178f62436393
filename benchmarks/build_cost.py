"""Build cost: ``GradientIndex.build`` per checkpoint against one training epoch, the per-triple loop and Captum (issue item 2).

Run from the repository root (defaults are the reported settings; a few minutes on 2 cores)::

    python benchmarks/build_cost.py

Model: a ConvE trained by ``tracin-index train --dataset umls`` (PyKEEN's bundled UMLS, 5,216 training
triples, ``--epochs 6 --checkpoint-every 2``: 3 checkpoints, PyKEEN defaults otherwise). Over the same
training triples (the run's ``train.tsv``), the same model and batch size 256, each repeat times, in a
rotating order and under the quiet-machine guard of ``benchmarks/common.py``:

1. ``build``: ``GradientIndex.build`` into a fresh folder with the defaults of ``tracin-index build``
   (last 2 layers, bce, sketch dim 128, CPU), the whole call: the plan checks, the replica check,
   principal directions, gradients and their stored factors, shard writing (with sha256), the final
   open. Reported per checkpoint (total / checkpoints), with a breakdown (plan and replica checks;
   bases; shards: gradients, encoding, writing; the rest) taken by wrapping those stages with timers;
2. ``gradients``: the gradient-only part, one pass of ``GradientComputer.compute`` over all triples
   at one checkpoint (``time_batched`` of ``gradient_throughput.py``);
3. ``epoch``: one PyKEEN sLCWA epoch (Adam, basic negative sampler, one negative per positive, same
   batch size, ``drop_last=False``) on a fresh copy of the model (``time_epoch`` of ``gradient_throughput.py``);
4. ``loop``: the original method, one ``torch.autograd.grad`` per triple over the same selected
   parameters (``time_loop``), on ``--loop-triples`` triples (default 1,000) extrapolated to all
   triples by per-triple rate (said in the JSON);
5. ``captum`` (if ``captum`` imports): the constructor of Captum's ``TracInCPFastRandProj``, which
   computes and projects every training example's last-layer gradient at every checkpoint and sets
   up the nearest-neighbour structure; the same checkpoints (with their learning rates), the same
   batch size and ``projection_dim`` 4096. Captum needs the model's output to be its final fully
   connected layer's output, so the model is wrapped: ``forward(h, r)`` runs ConvE up to
   ``interaction.hr1d.0`` (the Linear 10368 -> 200); the loss function runs the rest (BatchNorm1d,
   ReLU, dot with the tail embedding plus tail bias) and ``softplus(-score)`` summed, i.e. the same
   bce loss. Captum's fast method takes the gradient of that Linear's weight only (not its bias, not
   the BatchNorm), so it handles a subset of our selection, and it keeps its projected gradients in
   memory only. Its nearest-neighbour structure is a brute-force inner product in torch (Captum's
   default, Annoy, is not installed).

Writes ``benchmarks/results/build_cost.json`` and the summary keys ``build_vs_epoch_ratio`` (build seconds
per checkpoint / epoch seconds), ``build_vs_captum_speed`` (our triple-checkpoints per second over
Captum's) and ``build_vs_loop_speedup`` (loop seconds for all triples / build seconds per checkpoint).
Targets: build per checkpoint at most 0.5x one epoch, and faster than Captum.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import QuietGuard, command_line, machine_info, update_summary, versions, write_results  # noqa: E402
from gradient_throughput import time_batched, time_epoch, time_loop  # noqa: E402

from tracin_index.kg.directions import examples_per_fact, training_examples, uses_inverse_triples  # noqa: E402

TARGET_EPOCH_RATIO = 0.5
TARGET_CAPTUM_SPEED = 1.0


def train_run(workdir: Path, epochs: int, every: int, seed: int) -> tuple[Path, float]:
    run = workdir / "run-umls"
    if (run / "config.json").is_file() and (run / "checkpoints").is_dir():
        return run, 0.0
    if run.exists():
        shutil.rmtree(run)
    start = time.perf_counter()
    cmd = [shutil.which("tracin-index") or "tracin-index", "train", "--dataset", "umls", "--out", str(run),
           "--epochs", str(epochs), "--checkpoint-every", str(every), "--seed", str(seed)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"training failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return run, time.perf_counter() - start


class _StageTimer:
    """Wraps build stages (the plan, the replica check, the bases, the tasks) with timers, restoring them afterwards."""

    def __init__(self):
        import tracin_index.build.builder as builder
        from tracin_index.build.bases import CheckpointBases
        from tracin_index.build.task import TaskInputs

        self.stages = {
            "checks_s": [(builder, "plan_storage"), (builder.Builder, "_replica")],
            "bases_s": [(CheckpointBases, "at")],
            "shards_s": [(TaskInputs, "compute")],
        }
        self.seconds: dict[str, float] = {}
        self.saved = []

    def __enter__(self):
        for stage, methods in self.stages.items():
            for cls, name in methods:
                original = getattr(cls, name)
                self.saved.append((cls, name, cls.__dict__[name]))

                @functools.wraps(original)
                def timed(*args, _original=original, _stage=stage, **kwargs):
                    start = time.perf_counter()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        self.seconds[_stage] = self.seconds.get(_stage, 0.0) + time.perf_counter() - start

                setattr(cls, name, timed)
        return self

    def __exit__(self, *exc):
        for cls, name, value in self.saved:
            setattr(cls, name, value)


def time_build(run: Path, out: Path, batch_size: int) -> tuple[float, dict]:
    from tracin_index.index import GradientIndex

    if out.exists():
        shutil.rmtree(out)
    with _StageTimer() as stages:
        start = time.perf_counter()
        GradientIndex.build(out, model_path=run, device="cpu", batch_size=batch_size)
        seconds = time.perf_counter() - start
    parts = {stage: stages.seconds.get(stage, 0.0) for stage in stages.stages}
    parts["rest_s"] = seconds - sum(parts.values())
    parts["index_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return seconds, parts


# -- Captum ---------------------------------------------------------------------------------------


class _UpToFinalLinear(torch.nn.Module):
    """ConvE up to the output of its final Linear (``interaction.hr1d.0``): what Captum's fast TracIn needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.interaction = model.interaction
        self.fc = model.interaction.hr1d[0]

    def forward(self, h, r):
        head, relation, _ = self.model._get_representations(h=h, r=r, t=None, mode=None)
        info = self.interaction.shape_info
        x = torch.cat([head.view(-1, info.input_channels, info.image_height, info.image_width),
                       relation.view(-1, info.input_channels, info.image_height, info.image_width)], dim=-2)  # fmt: skip
        x = self.interaction.hr2d(x).view(-1, info.num_in_features)
        return self.fc(x)


def _rest_of_conve_loss(model):
    """loss_fn(fc output, tail ids): the layers after the final Linear, the score and softplus(-score), summed."""
    rest = model.interaction.hr1d[1:]

    def loss_fn(out, t):
        _, _, (t_emb, t_bias) = model._get_representations(h=None, r=None, t=t, mode=None)
        x = rest(out)
        scores = (x * t_emb).sum(-1) + t_bias.view(-1)
        return torch.nn.functional.softplus(-scores).sum()

    return loss_fn


def _torch_neighbors():
    from captum.influence._utils.nearest_neighbors import NearestNeighbors

    class FlatInnerProduct(NearestNeighbors):
        """Brute-force maximum inner product search (what Captum's default Annoy approximates)."""

        def setup(self, data):
            self.data = data.reshape(data.shape[0], -1).detach().float()

        def get_nearest_neighbors(self, query, k):
            scores = query.reshape(query.shape[0], -1).detach().float() @ self.data.T
            top = torch.topk(scores, k, dim=1)
            return top.indices, top.values

    return FlatInnerProduct()


def time_captum(model, hrt: torch.Tensor, checkpoints, batch_size: int, projection_dim: int) -> tuple[float, dict]:
    from captum.influence import TracInCPFastRandProj

    from tracin_index.kg.checkpoints import load_state_dict_into

    wrapper = _UpToFinalLinear(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)

    def load(net, path):
        checkpoint = next(c for c in checkpoints if str(c.path) == str(path))
        load_state_dict_into(model, checkpoint.load_state_dict(), str(path))
        model.eval()
        return checkpoint.learning_rate

    dataset = torch.utils.data.TensorDataset(hrt[:, 0], hrt[:, 1], hrt[:, 2])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        tracin = TracInCPFastRandProj(
            wrapper, wrapper.fc, dataset, [str(c.path) for c in checkpoints], checkpoints_load_func=load,
            loss_fn=_rest_of_conve_loss(model), batch_size=batch_size, nearest_neighbors=_torch_neighbors(),
            projection_dim=projection_dim, seed=0,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    data = tracin.nearest_neighbors.data
    return seconds, {"stored_dim": int(data.shape[1]), "ntotal": int(data.shape[0])}


def captum_loss_check(model, hrt: torch.Tensor) -> float:
    """Max abs difference between the wrapped model + loss_fn and tracin_index's per-triple bce loss."""
    from tracin_index.gradients.computer import per_example_losses

    model.eval()
    with torch.no_grad():
        wrapper = _UpToFinalLinear(model)
        loss_fn = _rest_of_conve_loss(model)
        ours = per_example_losses(model, hrt, "bce")
        theirs = torch.stack([loss_fn(wrapper(hrt[i : i + 1, 0], hrt[i : i + 1, 1]), hrt[i : i + 1, 2]) for i in range(len(hrt))])
    return float((ours - theirs).abs().max())


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the UMLS ConvE (default 6)")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="(default 2: 3 checkpoints)")
    parser.add_argument("--loop-triples", type=int, default=1000)
    parser.add_argument("--captum-projection-dim", type=int, default=4096)
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--captum-repeats", type=int, default=1, help="Captum is slow: timed this many times (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tracin-build-cost")
    parser.add_argument("--max-wait", type=float, default=20.0)
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--budget", type=float, default=900.0, help="no waiting or retrying after this many seconds")
    parser.add_argument("--name", default="build_cost")
    args = parser.parse_args(argv)
    command = command_line()
    machine_before = machine_info()

    from pykeen.triples import CoreTriplesFactory

    from tracin_index.gradients.computer import GradientComputer
    from tracin_index.gradients.selection import select_parameters
    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples
    from tracin_index.storage.plans import DEFAULT_SKETCH_DIM

    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run, train_s = train_run(args.workdir, args.epochs, args.checkpoint_every, args.seed)
    loaded = load_model(run)
    model = loaded.model.eval()
    checkpoints = loaded.checkpoints
    num_ckpt = len(checkpoints)
    hrt = torch.as_tensor(loaded.id_maps.to_ids(read_labeled_triples(loaded.training_path))).long()
    n = hrt.shape[0]
    inverse = uses_inverse_triples(model)
    per_fact = examples_per_fact(inverse)
    examples = training_examples(hrt, inverse)  # what the model was trained on, in its ids
    # the epoch as `tracin-index train` ran it: with inverse triples, PyKEEN trains on both examples of each triple
    factory = CoreTriplesFactory.create(mapped_triples=hrt, num_entities=model.num_entities,
                                        num_relations=loaded.id_maps.num_relations, create_inverse_triples=inverse)  # fmt: skip
    selection = select_parameters(model, mode="last", num_last_layers=2)
    gc = GradientComputer(model, selection, "bce")
    batches = [hrt[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    loop_n = min(n, args.loop_triples)
    captum_ok = not args.skip_captum
    captum_note = None
    if captum_ok:
        try:
            import captum

            captum_note = f"captum {captum.__version__}"
        except ImportError:
            captum_ok, captum_note = False, "captum not installed (pip install captum): skipped"

    # warm-up (untimed)
    time_batched(gc, batches[:2])
    time_loop(model, selection, examples[:16], "bce")
    time_epoch(model, factory, args.batch_size, args.seed)
    time_build(run, args.workdir / "idx-warmup", args.batch_size)
    loss_check = captum_loss_check(copy.deepcopy(model), examples[:32]) if captum_ok else None

    methods = ["build", "gradients", "epoch", "loop"] + (["captum"] if captum_ok else [])
    guard = QuietGuard(args.quiet_cores, args.max_wait, args.retries, run_start + args.budget)
    times = {m: [] for m in methods}
    foreign = {m: [] for m in methods}
    attempts = {m: [] for m in methods}
    build_parts = []
    captum_info = None
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            if method == "captum" and r >= args.captum_repeats:
                continue
            fn = {
                "build": lambda r=r: time_build(run, args.workdir / f"idx-{r}", args.batch_size),
                "gradients": lambda: time_batched(gc, batches),
                "epoch": lambda r=r: time_epoch(model, factory, args.batch_size, args.seed + 1 + r),
                "loop": lambda: time_loop(model, selection, examples[: per_fact * loop_n], "bce"),
                "captum": lambda: time_captum(copy.deepcopy(model), examples, checkpoints, args.batch_size,
                                              args.captum_projection_dim),  # fmt: skip
            }[method]
            m = guard.measure(fn)
            times[method].append(m.seconds)
            foreign[method].append(m.foreign)
            attempts[method].append(m.attempts)
            if method == "build":
                build_parts.append(m.result)
            if method == "captum":
                captum_info = m.result
            busy = "" if m.foreign is None else f" (others: {m.foreign:.2f} cores, {m.attempts} attempt(s))"
            print(f"repeat {r + 1}/{args.repeats} {method:9s} {m.seconds:8.3f} s{busy}", file=sys.stderr, flush=True)
        shutil.rmtree(args.workdir / f"idx-{r}", ignore_errors=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    build_per_ckpt = med["build"] / num_ckpt
    loop_full = med["loop"] / loop_n * n
    ratio = build_per_ckpt / med["epoch"]
    speedup = loop_full / build_per_ckpt
    parts_med = {k: statistics.median(p[k] for p in build_parts) for k in build_parts[0]}
    captum_speed = (med["captum"] / num_ckpt) / build_per_ckpt if captum_ok else None

    def entry(method, triples, **extra):
        return {"per_repeat_s": times[method], "median_s": med[method], "min_s": min(times[method]),
                "other_processes_cores_per_repeat": foreign[method], "attempts_per_repeat": attempts[method],
                "triples": triples, "triples_per_s": triples / med[method], **extra}  # fmt: skip

    results = {
        "machine": machine_before,
        "machine_after": machine_info(),
        "versions": {**versions(), "captum": captum_note},
        "command": command,
        "settings": {
            "model": f"ConvE trained by `tracin-index train --dataset umls --epochs {args.epochs} --checkpoint-every "
                     f"{args.checkpoint_every} --seed {args.seed}` ({train_s:.0f} s; reused if present)",
            "training_triples": n,
            "checkpoints": num_ckpt,
            "learning_rates": [c.learning_rate for c in checkpoints],
            "selection": selection.describe(),
            "loss": "bce",
            "batch_size": args.batch_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "captum_repeats": min(args.captum_repeats, args.repeats) if captum_ok else 0,
            "build": f"GradientIndex.build defaults of `tracin-index build`: sketch dim {DEFAULT_SKETCH_DIM}, device cpu; "
                     "fresh folder each repeat; whole call incl. the final open",
            "epoch": "SLCWATrainingLoop, Adam, basic negative sampler, 1 negative per positive, drop_last=False; "
                     "timed span PyKEEN's _train_epoch (gradient_throughput.time_epoch); over the same training "
                     "triples as the build (the run's train.tsv)" + (", with inverse triples as `tracin-index train` "
                     "trained this ConvE: two examples per triple, (h, r, t) and (t, r_inv, h)" if inverse else ""),
            "inverse_triples": inverse,
            "loop": f"one torch.autograd.grad per training example over the selected parameters, the {per_fact} "
                    f"example(s) of {loop_n} triples timed, extrapolated to {n} triples",
            "captum": None if not captum_ok else (
                f"TracInCPFastRandProj constructor over the {len(examples)} training examples (the {n} triples' "
                f"{per_fact} each), projection_dim {args.captum_projection_dim}, brute-force torch "
                "inner-product neighbours, model wrapped so that its output is interaction.hr1d.0 (Linear 10368->200); the rest of "
                "ConvE and softplus(-score) summed in loss_fn (same bce loss: max abs loss difference "
                f"{loss_check:.2e} on 32 triples). Captum takes that Linear's weight gradient only (no bias, no "
                "BatchNorm1d), a subset of tracin_index's selection"),
            "timing_guard": guard.describe(),
            "order": "methods rotated each repeat; one untimed warm-up of build, gradients, epoch, loop first",
        },
        "times": {
            "build": entry("build", n * num_ckpt, per_checkpoint_s=build_per_ckpt, breakdown_median_s=parts_med,
                           breakdown_per_repeat=build_parts),
            "gradients": entry("gradients", n, what="one checkpoint: GradientComputer.compute over all triples"),
            "epoch": entry("epoch", n),
            "loop": entry("loop", loop_n, full_s=loop_full, full_s_extrapolated=loop_n < n),
            **({"captum": entry("captum", n * num_ckpt, per_checkpoint_s=med["captum"] / num_ckpt, info=captum_info)}
               if captum_ok else {}),
        },
        "ratios": {
            "build_vs_epoch_ratio": ratio,
            "gradients_vs_epoch_ratio": med["gradients"] / med["epoch"],
            "build_vs_loop_speedup": speedup,
            **({"build_vs_captum_speed": captum_speed} if captum_ok else {}),
        },
        "index_bytes_per_triple_checkpoint": parts_med["index_bytes"] / (n * num_ckpt),
        "targets": {"build_vs_epoch_ratio_at_most": TARGET_EPOCH_RATIO, "build_vs_captum_speed_at_least": TARGET_CAPTUM_SPEED},
        "targets_met": {"build_vs_epoch_ratio": ratio <= TARGET_EPOCH_RATIO,
                        **({"build_vs_captum_speed": captum_speed >= TARGET_CAPTUM_SPEED} if captum_ok else {})},
        "total_runtime_s": time.perf_counter() - run_start,
    }
    if not captum_ok:
        results["settings"]["captum"] = captum_note or "skipped (--skip-captum)"
    path = write_results(args.name, results)
    if args.name == "build_cost":
        update_summary({"build_vs_epoch_ratio": round(ratio, 3), "build_vs_loop_speedup": round(speedup, 1),
                        **({"build_vs_captum_speed": round(captum_speed, 2)} if captum_ok else {})})
    print(f"UMLS ConvE, {n} triples, {num_ckpt} checkpoints, batch {args.batch_size}, median of {args.repeats}")
    print(f"build per checkpoint {build_per_ckpt:.3f} s  (breakdown, all checkpoints: "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts_med.items()) + ")")
    print(f"gradients only {med['gradients']:.3f} s, epoch {med['epoch']:.3f} s, loop (all triples) {loop_full:.2f} s")
    if captum_ok:
        print(f"captum per checkpoint {med['captum'] / num_ckpt:.3f} s: ours is {captum_speed:.2f}x as fast")
    print(f"build/epoch = {ratio:.2f} (target <= {TARGET_EPOCH_RATIO}: {'met' if ratio <= TARGET_EPOCH_RATIO else 'MISSED'}); "
          f"loop/build = {speedup:.1f}x")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
