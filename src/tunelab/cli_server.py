"""`tunelab serve`, `tunelab worker`, `tunelab keys ...`: the platform's commands."""
from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.errors import TunelabError

keys_app = typer.Typer(no_args_is_help=True, help="API keys for `tunelab serve`.")
DataDir = typer.Option(None, "--data-dir", help="state and files (default: $TUNELAB_HOME or "
                       "~/.tunelab)")
Database = typer.Option(None, "--database", envvar="TUNELAB_DATABASE_URL", show_envvar=True,
                        help="the job store: postgresql://USER:PASSWORD@HOST/DB for workers on "
                        "several hosts (default: SQLite in the data dir)")
Ray = typer.Option(None, "--ray", envvar="TUNELAB_RAY_ADDRESS", show_envvar=True,
                   help="train fine-tuning jobs on this Ray cluster (HOST:PORT of its head, "
                   "run from one of its nodes): Ray places each job on nodes with the CPUs/GPUs "
                   "it asks for, and a job may train on several workers (\"tunelab\": "
                   "{\"workers\": N})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_models(items: list[str]) -> dict[str, str]:
    """`--model NAME=SPEC` or `--model SPEC` (named after its folder or alias)."""
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = Path(item.rstrip("/")).name or item, item
        name, spec = name.strip(), spec.strip()
        if not name or not spec or name.startswith("ft:") or ":" in name:
            raise TunelabError(f"expected NAME=SPEC (a name without ':'), got {item!r}",
                               field="model")
        local = Path(spec).expanduser()
        out[name] = str(local.resolve()) if local.exists() else spec
    return out


def serve(host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(8000, help="port (0: any free port; the URL is printed)"),
          data_dir: Optional[Path] = DataDir,
          database: Optional[str] = Database,
          ray: Optional[str] = Ray,
          workers: int = typer.Option(1, "--workers", min=0, help="job worker processes"),
          no_auth: bool = typer.Option(False, "--no-auth", help="no API keys (single user, "
                                       "loopback host only)"),
          model: list[str] = typer.Option([], "--model", help="a base model to offer besides "
                                          "the builtin ones: NAME=SPEC or SPEC (a folder, "
                                          ".gguf or hub id); repeatable"),
          max_upload_mb: float = typer.Option(512, "--max-upload-mb", help="largest upload"),
          max_body_mb: float = typer.Option(8, "--max-body-mb", min=0.001, help="largest "
                                            "request body other than an upload (413 beyond)"),
          memory_budget_gb: Optional[float] = typer.Option(None, "--memory-budget-gb",
                                                           help="model weights kept loaded "
                                                           "for chat (default: from free RAM)"),
          worker_threads: Optional[int] = typer.Option(None, "--worker-threads", help="torch "
                                                       "threads per worker (default: cores / "
                                                       "workers)"),
          max_adapters: int = typer.Option(64, "--max-adapters", min=1, help="LoRA fine-tunes "
                                           "kept loaded per base model (least recently used "
                                           "go first; the others wait on disk)"),
          prefill_chunk: int = typer.Option(256, "--prefill-chunk", min=0, help="a long "
                                            "prompt is read this many tokens per step, between "
                                            "the other streams' tokens (0: all at once)"),
          precision: str = typer.Option("auto", "--precision", help="weights for chat: auto "
                                        "(bf16 where the CPU/GPU runs it natively), bf16 or "
                                        "fp32"),
          engine: str = typer.Option("tunelab", "--engine", help="what generates chat answers: "
                                     "tunelab (built in) or vllm (vLLM's OpenAI server, see "
                                     "`make vllm`)"),
          vllm_url: Optional[str] = typer.Option(None, "--vllm-url", help="with --engine vllm: "
                                                 "an already running vLLM server to use instead "
                                                 "of starting one"),
          vllm_python: Optional[str] = typer.Option(None, "--vllm-python", help="with --engine "
                                                    "vllm: the python of vLLM's virtualenv "
                                                    "(default: .venv-vllm, from `make vllm`)"),
          train_price_per_hour: Optional[float] = typer.Option(
              None, "--train-price-per-hour", min=0, help="USD per hour of the machine jobs "
              "train on: a finished job shows its measured training time at this price "
              "(default: tunelab compare's, see tunelab.evaluate.cost)")):
    """Start the OpenAI-compatible API, the web page and N job workers."""
    import logging

    import uvicorn

    from tunelab.jobs.store import data_home, database_url, shown_url
    from tunelab.runtime import available_cores
    from tunelab.server.app import create_app
    from tunelab.server.context import Settings
    from tunelab.server.supervisor import Supervisor
    if no_auth and not _is_loopback(host):
        raise TunelabError(f"--no-auth on {host} would let anyone on the network use this "
                           "server: listen on 127.0.0.1, or create keys with `tunelab keys "
                           "create NAME`", field="no-auth")
    from tunelab.server.engine import ENGINES
    if engine not in ENGINES:
        raise TunelabError(f"--engine takes one of {', '.join(ENGINES)}, got {engine!r}",
                           field="engine")
    if precision not in ("auto", "bf16", "fp32"):
        raise TunelabError(f"--precision takes auto, bf16 or fp32, got {precision!r}",
                           field="precision")
    if (vllm_url or vllm_python) and engine != "vllm":
        raise TunelabError("--vllm-url and --vllm-python need --engine vllm",
                           field="vllm-url" if vllm_url else "vllm-python")
    if engine == "vllm" and not vllm_url:   # a missing vLLM is said now, not at the first chat
        from tunelab.server.engine.vllm import find_python
        vllm_python = find_python(vllm_python)
    root = data_home(data_dir)
    db_url = database_url(database, root) if database else None   # a bad URL: said now
    ray = (ray or "").strip() or None
    settings = Settings(database_url=db_url, ray_address=ray, engine=engine, vllm_url=vllm_url, vllm_python=vllm_python,
                        max_adapters=max_adapters,
                        prefill_chunk=prefill_chunk, precision=precision,
                        data_dir=root, auth=not no_auth, models=_parse_models(model),
                        max_upload_bytes=int(max_upload_mb * 2**20), workers=workers,
                        max_body_bytes=int(max_body_mb * 2**20),
                        memory_budget_bytes=int(memory_budget_gb * 2**30)
                        if memory_budget_gb else None,
                        train_price_per_hour=train_price_per_hour)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threads = worker_threads or max(1, available_cores() // max(1, workers))
    supervisor = Supervisor(workers, root, threads=threads, logs=root / "logs",
                            env={"TUNELAB_DATABASE_URL": db_url} if db_url else None,
                            ray_address=ray)
    app = create_app(settings, supervisor)
    if settings.auth and not app.state.ctx.store.list_keys():
        print("tunelab: no API keys yet: create one with `tunelab keys create NAME`"
              + (f" --data-dir {root}" if data_dir else ""), file=sys.stderr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror}", field="port") \
            from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    where = f", database {shown_url(db_url)}" if db_url else ""
    where += f", Ray cluster {ray}" if ray else ""
    print(f"tunelab: serving http://{shown}:{bound} (data {root}{where}, {workers} workers)",
          flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def worker(data_dir: Optional[Path] = DataDir,
           database: Optional[str] = Database,
           ray: Optional[str] = Ray,
           threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)")):
    """Run queued jobs (fine-tuning, evaluations) from the data dir's database, one at a time.
    On another host: the same --database and a --data-dir that mounts the server's data dir.
    With --ray, fine-tuning jobs train on the Ray cluster (this host must be one of its nodes)."""
    from tunelab.jobs.worker import main
    main(str(data_dir) if data_dir else None, threads=threads, database=database,
         ray_address=(ray or "").strip() or None)


@keys_app.command("create")
def keys_create(name: str = typer.Argument(..., help="who the key is for (part of model names)"),
                data_dir: Optional[Path] = DataDir, database: Optional[str] = Database):
    """Create a key and print it, once: only its hash is stored."""
    from tunelab.jobs.store import Store
    key, token = Store(data_dir, database).create_key(name)
    print(token)
    print(f"tunelab: key '{key.name}' ({key.id}) created; it is shown only now", file=sys.stderr)


@keys_app.command("list")
def keys_list(data_dir: Optional[Path] = DataDir, database: Optional[str] = Database):
    """List keys (name, id, first characters, created, revoked)."""
    import datetime as dt

    from tunelab.jobs.store import Store

    def when(t):
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"
    keys = Store(data_dir, database).list_keys()
    if not keys:
        print("no keys (create one with `tunelab keys create NAME`)", file=sys.stderr)
    for k in keys:
        print(f"{k.name:20} {k.id:22} {k.prefix}...  created {when(k.created_at)}  "
              f"revoked {when(k.revoked_at)}")


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="the key's name or id"),
                data_dir: Optional[Path] = DataDir, database: Optional[str] = Database):
    """Revoke a key: its requests answer 401 from now on (its files and models stay)."""
    from tunelab.jobs.store import Store
    key = Store(data_dir, database).revoke_key(name)
    print(f"revoked key '{key.name}' ({key.id})", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(worker)
    app.add_typer(keys_app, name="keys")
