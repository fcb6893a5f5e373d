"""What the GPU checks need on a lent GPU machine, packed here: `make gpu-bundle`.

A lent machine (this workplace's device tool) has PyTorch, transformers, accelerate and peft in
its image, but not TRL, datasets, liger-kernel, bitsandbytes or pydantic, it reaches no package
index, and only ~64 MB travel with the working tree. This writes `.device/` (git-ignored):

  wheels/     this venv's versions of what tunelab and bench/gpu.py import beyond the image
              (transformers and peft too: the image's are older), built for
              the machine's Python (3.12), plus liger-kernel and bitsandbytes; bitsandbytes
              with its CUDA 13 libraries only (the image's torch is cu130; all of them: 170 MB)
  tokenizer/  SmolLM2's tokenizer, so the random-weight models and the tests' tiny model have
              the real one (the builtin model's 270 MB of weights do not travel)

and prints the one call that runs everything there, in order, within one device call:

    device run  carry: [".device"]  timeout_s: 590  command: bash bench/gpu_device.sh

gpu_device.sh installs the wheels into /tmp/site (no network needed), runs the CUDA tests
(tests/test_gpu.py and tests/test_attention.py), then bench/gpu.py on a random 1.1B Llama and
SmolLM2-135M's shape, writing what it measures into $OUT as it goes.

    .venv/bin/python bench/gpu_device.py [--python-version 3.12]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the versions this venv runs (tunelab is tested with them), for what the image lacks or has
# older; `datasets` pins dill, multiprocess and fsspec within ranges the image may not meet.
# Not huggingface_hub: the image's 1.33 meets transformers' and datasets' ranges, and 2.x needs
# httpx2 as well.
FROM_THIS_VENV = ("transformers", "trl", "peft", "datasets", "dill", "multiprocess", "fsspec",
                  "pydantic", "pydantic_core", "annotated-types", "typing-inspection")
# GPU-only, so not in this venv: pinned here
GPU_ONLY = ("liger-kernel==0.8.5", "bitsandbytes==0.50.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
TRAVEL_LIMIT = 64 * 2**20        # the device tool's limit on what travels, the tree included


def download(folder: Path, python_version: str) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in FROM_THIS_VENV]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           *(x for p in PLATFORMS for x in ("--platform", p)), "-d", str(folder),
           *pins, *GPU_ONLY]
    subprocess.run(cmd, check=True)


def keep_cuda13_only(wheel: Path) -> None:
    """bitsandbytes ships a library per CUDA and ROCm version (170 MB); it loads the one for
    torch.version.cuda, so the cu130 image needs only cuda13x's. Rewritten in place, RECORD
    without the dropped files (pip installs what the archive holds)."""
    def dropped(name: str) -> bool:
        lib = name.rsplit("/", 1)[-1]
        return lib.startswith("libbitsandbytes_") and not lib.startswith(
            ("libbitsandbytes_cuda13", "libbitsandbytes_cpu"))
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, \
            zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(item, data)
    trimmed.replace(wheel)


def copy_tokenizer(folder: Path) -> None:
    from tunelab.models import resolve
    source = Path(resolve("smollm2-135m-instruct").path)
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def tree_bytes() -> int:
    """What else travels: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files
               if f and (ROOT / f.decode()).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--out", default=str(ROOT / ".device"))
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    download(out / "wheels", a.python_version)
    for wheel in (out / "wheels").glob("bitsandbytes-*.whl"):
        keep_cuda13_only(wheel)
    copy_tokenizer(out / "tokenizer")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    total = size + tree_bytes()
    for f in sorted((out / "wheels").iterdir()):
        print(f"  {f.stat().st_size / 2**20:6.1f} MB  {f.name}")
    print(f"{out}: {size / 2**20:.1f} MB; with the working tree {total / 2**20:.1f} MB of the "
          f"{TRAVEL_LIMIT / 2**20:.0f} MB that may travel")
    if total > TRAVEL_LIMIT:
        sys.exit("too large to travel with the working tree")
    print('on a GPU: device run, carry [".device"], timeout_s 590, command: '
          'bash bench/gpu_device.sh')


if __name__ == "__main__":
    main()
