"""Side by side with the peers (not a test): ckaflow and three CKA libraries on one job, in one run.

The job: two timm resnet18 with random weights (seeds 0 and 1, eval mode), 1,024 synthetic 64 px images
(fixed-seed random pixels, normalised with ImageNet's mean and std) through ONE shared DataLoader (batch
128, in order), 24 sites per model (per block: act1, bn2 and the block output), flattened conv maps.

Peers, each in its normal usage, forward passes included (fresh copies of the models for everybody):

- torch-cka 0.21 (`torch_cka.CKA(...).compare(loader)`): minibatch CKA, unbiased HSIC_1 summed over the
  loader's batches, float32 Grams of the uncentred features; hooks keep a reference to each output.
- pytorch-cka 1.1.3 (`cka.compute_cka(m1, m2, loader, layers=...)`): the same estimator, vectorised over
  the sites, clamped to [0, 1], a zero denominator replaced by 1e-6; hooks keep `output.detach()`
  flattened: a view of the output when the map is NCHW-contiguous (a copy for channels_last maps).
- ckatorch 1.0.3: its `CKA` class takes (batch, tokens, dim) outputs and fails on 4-D conv maps (checked
  here), and it keeps only the last batch's value; its `cka_batch` (minibatch HSIC_1, float64) is used on
  features this script captures with cloning hooks, all the loader's batches stacked, per pair of sites.

ckaflow: `ckaflow.compare()` in-process on the same images written once as PNGs (an image folder; same
pixels, same normalisation: checked), once with the full-batch biased estimator, once with minibatch CKA
(its own seeded batches of 128); and the array path: the features captured once with hooks that clone,
then `cka_matrix` (biased, full batch) and `minibatch_cka_matrix` on the DataLoader's very batches.

Printed: seconds (fastest of --repeats where a run is cheap: the array path), ratios peer / ckaflow
measured in this run, each peer's max |difference| to ckaflow on its own estimator (all entries, and
without the bn2 rows and columns), and at which bn2 sites a peer's own hooks hold the block output after
a forward pass (probed on one batch: a hook that keeps a reference to bn2's output sees `x += shortcut`
and the in-place ReLU change it), with the peer's difference to ckaflow once those rows read as the block's.

    pip install -e '.[peers]'
    .venv/bin/python benchmarks/peers.py            # the full job
    .venv/bin/python benchmarks/peers.py --quick    # 256 images of 32 px, 9 sites per model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")      # the peers' progress bars

import numpy as np
import torch

# pytorch-cka's module is `cka`, like this folder's benchmarks/cka.py: import from the repository root, not here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PEERS = {"torch_cka": "torch-cka==0.21", "cka": "pytorch-cka==1.1.3", "ckatorch": "ckatorch==1.0.3"}


def require_peers() -> dict[str, object]:
    modules, missing = {}, []
    for module, requirement in PEERS.items():
        try:
            modules[module] = importlib.import_module(module)
        except ImportError:
            missing.append(requirement)
    if missing:
        sys.exit(f"benchmarks/peers.py needs the peer libraries, not installed here: {', '.join(missing)}\n"
                 "install them with:  pip install -e '.[peers]'")
    return modules


def default_layers(quick: bool) -> list[str]:
    blocks = ["layer3.1", "layer4.0", "layer4.1"] if quick else [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    return [name for block in blocks for name in (f"{block}.act1", f"{block}.bn2", block)]


def make_models(seeds=(0, 1)) -> list[torch.nn.Module]:
    import timm

    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        # zero_init_last=False: timm zero-initialises each block's last BN weight, so with random weights every
        # bn2 output would be the constant 0 and its CKA undefined.
        models.append(timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval())
    return models


def make_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 (n, size, size, 3) pixels and the normalised float32 (n, 3, size, size) tensor of them."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    # contiguous NCHW, as ToTensor gives (the permuted HWC pixels would make the peers' inputs channels_last)
    return pixels, ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).contiguous()


def write_folder(pixels: np.ndarray, root: Path) -> Path:
    from PIL import Image

    folder = root / "images"
    (folder / "noise").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / "noise" / f"{i:05d}.png")
    return folder


def preprocessing_config(size: int) -> dict:
    """timm's eval transform, made the identity on size x size images: resize to size (a no-op), crop 1.0."""
    return {"input_size": size, "crop_pct": 1.0, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic"}


def check_same_inputs(model: torch.nn.Module, folder: Path, images: torch.Tensor, size: int) -> float:
    """Max |difference| between ckaflow's preprocessing of the PNGs and the DataLoader's tensors."""
    from PIL import Image

    from tasks.extract import preprocessing

    transform = preprocessing(model, preprocessing_config(size))
    return max(float((transform(Image.open(folder / "noise" / f"{i:05d}.png").convert("RGB")) - images[i]).abs().max())
               for i in (0, len(images) - 1))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def capture(models, layers, loader) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
    """Per model, layer -> (N, d) float32 features, flattened per sample and cloned in the hook; and the
    loader's batches as row lists."""
    feats = [{layer: [] for layer in layers} for _ in models]
    handles = []
    for model, out in zip(models, feats, strict=True):
        modules = dict(model.named_modules())
        for layer in layers:
            handles.append(modules[layer].register_forward_hook(
                lambda m, i, o, rows=out[layer]: rows.append(o.detach().flatten(1).clone())))
    batches, start = [], 0
    try:
        with torch.inference_mode():
            for (x,) in loader:
                for model in models:
                    model(x)
                batches.append(list(range(start, start + len(x))))
                start += len(x)
    finally:
        for handle in handles:
            handle.remove()
    return [{k: torch.cat(v) for k, v in f.items()} for f in feats], batches


# --- the peers, each in its normal usage -------------------------------------------------------------

def run_torch_cka(lib, m1, m2, layers, loader) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = lib.CKA(m1, m2, model1_name="a", model2_name="b", model1_layers=layers, model2_layers=layers,
                      device="cpu")
        cka.compare(loader)
    # rows and columns come in the order the hooks fired (forward order), not the order of `layers`
    order = list(cka.model1_features)
    assert order == list(cka.model2_features)
    return cka.export()["CKA"].numpy(), order


def run_pytorch_cka(lib, m1, m2, layers, loader) -> tuple[np.ndarray, list[str]]:
    return lib.compute_cka(m1, m2, loader, layers=layers, device="cpu", progress=False)[0].numpy(), list(layers)


def run_ckatorch(lib, m1, m2, layers, loader) -> tuple[np.ndarray, list[str]]:
    """ckatorch's minibatch CKA (`cka_batch`: HSIC_1 of each batch, summed) on features captured with cloning
    hooks: its CKA class cannot take conv maps (see ckatorch_class_fails)."""
    feats, batches = capture([m1, m2], layers, loader)
    k, m = len(batches), len(batches[0])
    if any(len(b) != m for b in batches):
        sys.exit("ckatorch's cka_batch needs equal batches: choose --n a multiple of --batch")
    stacks = [{layer: f[layer].reshape(k, m, -1) for layer in layers} for f in feats]
    out = np.empty((len(layers), len(layers)))
    with torch.inference_mode():
        for i, a in enumerate(layers):
            for j, b in enumerate(layers):
                out[i, j] = float(lib.cka_batch(stacks[0][a], stacks[1][b]))
    return out, list(layers)


def ckatorch_class_fails(lib, m1, m2, layers, loader) -> str:
    """What ckatorch's own CKA class does on these conv maps (one batch)."""
    first = torch.utils.data.Subset(loader.dataset, range(min(loader.batch_size, len(loader.dataset))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.CKA(m1, m2, layers=layers, first_name="a", second_name="b")(
                torch.utils.data.DataLoader(first, batch_size=loader.batch_size), epochs=1)
    except Exception as error:  # noqa: BLE001  (reported, whatever it is)
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "no error"


# --- ckaflow ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _show_on_error(log: io.StringIO):
    try:
        yield
    except BaseException:
        sys.__stderr__.write(log.getvalue()[-5000:])
        raise


def run_compare(m1, m2, folder, sites, similarity, args, base: Path) -> tuple[float, dict]:
    import ckaflow
    from tasks.analyses.options import ANALYSES

    store = tempfile.mkdtemp(prefix="store-", dir=base)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), _show_on_error(quiet):
        seconds, result = timed(lambda: ckaflow.compare(
            models={"a": m1, "b": m2}, images=str(folder), store=store, sites=sites, reduction="flatten",
            preprocessing=preprocessing_config(args.size), similarity=similarity, analyses={"skip": list(ANALYSES)},
            report=False, compute={"device": "cpu", "batch_size": args.batch, "threads": args.threads,
                                   "shard_size": args.n}))
    return seconds, result.similarity


def cross_block(matrix, layers) -> np.ndarray:
    """The a x b block of a stored similarity matrix, rows and columns in `layers` order."""
    a = matrix.sel(model_a="a", model_b="b")
    rows = {layer: i for i, layer in enumerate(map(str, a.layer_a.values))}
    cols = {layer: j for j, layer in enumerate(map(str, a.layer_b.values))}
    values = np.asarray(a.values, dtype=np.float64)
    return values[np.ix_([rows[x] for x in layers], [cols[x] for x in layers])]


def array_cross(result, layers) -> np.ndarray:
    """The a x b block of an array-path result (a DataArray, or a Dataset with `cka`)."""
    matrix = result["cka"] if "cka" in getattr(result, "data_vars", {}) else result
    rows, cols = [f"a/{x}" for x in layers], [f"b/{x}" for x in layers]
    return np.asarray(matrix.sel(site_a=rows, site_b=cols).values, dtype=np.float64)


def reorder(matrix: np.ndarray, order: list[str], layers: list[str]) -> np.ndarray:
    index = [order.index(x) for x in layers]
    return matrix[np.ix_(index, index)]


def peer_hsic_on_clones(lib, feats, layers, batches, dtype) -> np.ndarray:
    """pytorch-cka's own `hsic` (minibatch HSIC_1, summed over the batches, not clamped) on the features
    captured with cloning hooks, with Grams in `dtype`: what its estimator gives without the in-place capture,
    in float32 (as it runs) and in float64."""
    xy = xx = yy = 0
    for rows in batches:
        grams = [torch.stack([f[layer][rows].to(dtype) @ f[layer][rows].to(dtype).T for layer in layers])
                 for f in feats]
        cross, self_a, self_b = lib.hsic(*grams)
        xy, xx, yy = xy + cross.double(), xx + self_a.double(), yy + self_b.double()
    return (xy / torch.sqrt(xx[:, None] * yy[None, :])).numpy()


def block_of(layer: str) -> str:
    return layer.rsplit(".", 1)[0] if layer.endswith((".bn2", ".act1")) else layer


def hooks_hold_block_output(peer: str, lib, m1, m2, layers, x) -> list[str]:
    """The bn2 layers where the peer's own hooks, after one forward pass of x, hold the block output instead of
    bn2's output (compared with a capture that clones)."""
    truth = capture([copy.deepcopy(m1)], layers, [(x,)])[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if peer == "torch-cka":
            cka = lib.CKA(m1, m2, model1_name="a", model2_name="b", model1_layers=layers, model2_layers=layers)
            m1(x)
            held = dict(cka.model1_features)
        elif peer == "pytorch-cka":
            with lib.CKA(m1, m2, layers=layers, device="cpu") as cka, torch.inference_mode():
                m1(x)
                held = dict(cka._model1_layer_to_feature)   # its features dict, emptied on exit
        else:
            cka = lib.CKA(m1, m2, layers=layers, first_name="a", second_name="b")
            with torch.no_grad():
                m1(x)
            held = dict(cka.first_features)
    return [layer for layer in layers if layer.endswith(".bn2") and block_of(layer) in layers
            and torch.equal(held[layer].flatten(1), held[block_of(layer)].flatten(1))
            and not torch.allclose(held[layer].flatten(1), truth[layer])]


def bn2_as_block(matrix: np.ndarray, layers: list[str], reference: np.ndarray, which: list[str]) -> str:
    """`which` (bn2 layers read as their block output), with the max |difference| of `matrix` to `reference`
    once those rows and columns of the reference are the block output's."""
    if not which:
        return "none"
    swap = [layers.index(block_of(x)) if x in which else k for k, x in enumerate(layers)]
    gap = np.nanmax(np.abs(matrix - reference[np.ix_(swap, swap)]))
    n_bn2 = sum(x.endswith(".bn2") for x in layers)
    return f"{f'all {len(which)}' if len(which) == n_bn2 else ', '.join(which)} (then max abs diff {gap:.1e})"


def max_diff(p: np.ndarray, ref: np.ndarray, layers: list[str]) -> tuple[float, float]:
    keep = [i for i, layer in enumerate(layers) if not layer.endswith(".bn2")]
    return float(np.nanmax(np.abs(p - ref))), float(np.nanmax(np.abs(p[np.ix_(keep, keep)] - ref[np.ix_(keep, keep)])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="images")
    parser.add_argument("--size", type=int, default=64, help="image size in px")
    parser.add_argument("--batch", type=int, default=128, help="the shared DataLoader's batch size")
    parser.add_argument("--layers", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help="comma-separated module names of both resnet18 (default: per block act1, bn2, output)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for everybody")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the (cheap) array-path CKA; the fastest counts")
    parser.add_argument("--quick", action="store_true",
                        help="256 images of 32 px, 9 sites per model (layer3.1, layer4.*): about a minute on a busy machine")
    parser.add_argument("--dir", default=None, help="where the PNGs and the stores go, kept (default: a temporary directory, removed)")
    args = parser.parse_args()
    if args.quick:
        args.n = 256 if args.n == 1024 else args.n
        args.size = 32 if args.size == 64 else args.size
    layers = args.layers or default_layers(args.quick)
    libs = require_peers()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        run_job(args, layers, libs, Path(args.dir))
    else:   # the stores of the full job take about 2 GB: removed afterwards
        with tempfile.TemporaryDirectory(prefix="ckaflow-peers-") as tmp:
            run_job(args, layers, libs, Path(tmp))


def run_job(args: argparse.Namespace, layers: list[str], libs: dict, base: Path) -> None:
    import ckaflow

    m1, m2 = make_models()
    pixels, images = make_images(args.n, args.size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=args.batch)
    folder = write_folder(pixels, base)
    sites = [f"{layer}:output" for layer in layers]   # ckaflow's site <module>/output: the module's output
    print(f"job: 2 x timm resnet18 (random, seeds 0 and 1), {args.n} images of {args.size} px, DataLoader batch "
          f"{args.batch}, {len(layers)} sites per model, flatten; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start")
    print(f"same inputs: ckaflow's preprocessing of the PNGs vs the DataLoader's tensors, max |diff| "
          f"{check_same_inputs(m1, folder, images, args.size):.1e}")
    print(f"ckatorch's own CKA class on these conv maps: {ckatorch_class_fails(libs['ckatorch'], copy.deepcopy(m1), copy.deepcopy(m2), layers, loader)}")

    fresh = lambda: (copy.deepcopy(m1), copy.deepcopy(m2))  # noqa: E731  (every run gets unhooked copies)
    held = {peer: hooks_hold_block_output(peer, libs[module], *fresh(), layers, images[:args.batch])
            for peer, module in (("torch-cka", "torch_cka"), ("pytorch-cka", "cka"), ("ckatorch", "ckatorch"))}
    print("bn2 sites whose peer hooks hold the block output after a forward pass: "
          + "; ".join(f"{peer} {', '.join(v) or 'none'}" for peer, v in held.items()))
    with torch.inference_mode():   # warm-up (oneDNN, allocator) before anything is timed
        for model in (m1, m2):
            model(images[:args.batch])
            model(images[:args.batch].contiguous(memory_format=torch.channels_last))
    timings, matrices = {}, {}
    for name, run in (("torch-cka 0.21", lambda: run_torch_cka(libs["torch_cka"], *fresh(), layers, loader)),
                      ("pytorch-cka 1.1.3", lambda: run_pytorch_cka(libs["cka"], *fresh(), layers, loader)),
                      ("ckatorch 1.0.3 (cka_batch)", lambda: run_ckatorch(libs["ckatorch"], *fresh(), layers, loader))):
        seconds, (matrix, order) = timed(run)
        timings[name], matrices[name] = seconds, reorder(matrix, order, layers)
        print(f"  {name}: {seconds:.1f} s")

    biased_s, biased = run_compare(*fresh(), folder, sites, [{"kernel": "linear", "estimator": "biased"}], args, base)
    print(f"  ckaflow.compare (biased): {biased_s:.1f} s")
    mb_s, mb = run_compare(*fresh(), folder, sites, [{"kernel": "linear", "estimator": "unbiased", "method": "minibatch",
                                                      "batch_size": args.batch}], args, base)
    print(f"  ckaflow.compare (minibatch): {mb_s:.1f} s")
    compare_biased = cross_block(biased["linear_biased"], layers)
    compare_mb = cross_block(mb["linear_unbiased_minibatch"], layers)

    capture_s, (feats, batches) = timed(lambda: capture(list(fresh()), layers, loader))
    arrays = {f"{model}/{layer}": feats[k][layer].numpy() for k, model in enumerate("ab") for layer in layers}
    runs = [timed(lambda: ckaflow.cka_matrix(arrays, device="cpu")) for _ in range(args.repeats)]
    exact_s, exact = min(runs, key=lambda r: r[0])
    runs = [timed(lambda: ckaflow.minibatch_cka_matrix(arrays, batches=batches, device="cpu"))
            for _ in range(args.repeats)]
    minibatch_s, minibatch = min(runs, key=lambda r: r[0])
    exact, minibatch = array_cross(exact, layers), array_cross(minibatch, layers)
    _, minibatch64 = timed(lambda: ckaflow.minibatch_cka_matrix(arrays, batches=batches, device="cpu", precision="float64"))
    minibatch64 = array_cross(minibatch64, layers)
    print(f"  ckaflow arrays: capture {capture_s:.1f} s, cka_matrix {exact_s:.2f} s, minibatch_cka_matrix "
          f"{minibatch_s:.2f} s (fastest of {args.repeats})")
    print(f"end: load average {os.getloadavg()[0]:.2f}")

    pairs = len(layers) ** 2
    mb_total = capture_s + minibatch_s
    print(f"\nthe peers compute the {pairs} cross-model pairs; ckaflow every pair of the {2 * len(layers)} sites "
          f"({len(layers) * (2 * len(layers) - 1)} pairs, within each model too)")
    print(f"\n| run | estimator | seconds | / compare() | / ckaflow arrays | "
          "max abs diff to ckaflow | same, without bn2 | bn2 rows = block output |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ref_name in (("torch-cka 0.21", "mb"), ("pytorch-cka 1.1.3", "mb"), ("ckatorch 1.0.3 (cka_batch)", "mb")):
        every, kept = max_diff(matrices[name], minibatch, layers)
        print(f"| {name} | minibatch unbiased | {timings[name]:.1f} | {timings[name] / mb_s:.1f}x | "
              f"{timings[name] / mb_total:.1f}x | {every:.1e} | {kept:.1e} | "
              f"{bn2_as_block(matrices[name], layers, minibatch, held[name.split()[0]] if 'cka_batch' not in name else [])} |")
    every, kept = max_diff(compare_mb, minibatch, layers)
    print(f"| ckaflow.compare(), minibatch (its seeded batches) | minibatch unbiased | {mb_s:.1f} | 1.0x | "
          f"{mb_s / mb_total:.1f}x | {every:.1e} (other batches) | {kept:.1e} | "
          f"none |")
    print(f"| ckaflow arrays: capture + minibatch_cka_matrix (the loader's batches) | minibatch unbiased | "
          f"{mb_total:.1f} ({capture_s:.1f} + {minibatch_s:.2f}) | {mb_total / mb_s:.1f}x | 1.0x | reference | | "
          f"none (hooks clone) |")
    every, kept = max_diff(compare_biased, exact, layers)
    print(f"| ckaflow.compare(), full batch | biased | {biased_s:.1f} | 1.0x | {biased_s / (capture_s + exact_s):.1f}x | "
          f"{every:.1e} (vs arrays) | {kept:.1e} | none |")
    print(f"| ckaflow arrays: capture + cka_matrix | biased | {capture_s + exact_s:.1f} ({capture_s:.1f} + "
          f"{exact_s:.2f}) | {(capture_s + exact_s) / biased_s:.1f}x | 1.0x | reference | | "
          f"none (hooks clone) |")
    print(f"\nckaflow minibatch, float32 vs float64 Grams: max |diff| {np.nanmax(np.abs(minibatch - minibatch64)):.1e}; "
          "each peer vs the float64 one: " + ", ".join(
              f"{name} {np.nanmax(np.abs(matrices[name] - minibatch64)):.1e} "
              f"(without bn2 {max_diff(matrices[name], minibatch64, layers)[1]:.1e})" for name in matrices))
    for dtype in (torch.float32, torch.float64):
        ours = peer_hsic_on_clones(libs["cka"], feats, layers, batches, dtype)
        every, kept = max_diff(ours, minibatch64, layers)
        print(f"pytorch-cka's hsic() on cloned features, {str(dtype)[6:]} Grams, vs ckaflow float64: max |diff| "
              f"{every:.1e} (without bn2 {kept:.1e})")
    outside = int(((minibatch64 < 0) | (minibatch64 > 1)).sum())
    print(f"ckaflow minibatch entries outside [0, 1] (what pytorch-cka's clamp would change): {outside}")
    print(f"biased full batch vs minibatch (ckaflow, the loader's batches): max |diff| "
          f"{np.nanmax(np.abs(exact - minibatch)):.2f}")


if __name__ == "__main__":
    main()
