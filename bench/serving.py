"""bnserve against the in-process limit, a naive server, LitServe and a no-op endpoint, in one run.

Every contender is a real server process on loopback serving the same weights; `hey` drives each
with 1, 16 and 64 keep-alive clients POSTing the same one-sample JSON body, while every other
server is paused (SIGSTOP), so each has the CPU to itself. Rounds interleave all contenders (in a
rotated order) so the machine's drift hits all alike; per-round ratios and their medians are
printed and written to JSON with every round's figures. The in-process limit is bnserve's own
`build_loaded` module run without HTTP at the mean batch bnserve formed under the same load.
`--images` adds issue 15's row (`bench/images.py`): on the same bnserve server, 32x32 PNG
requests/s against the same samples sent as JSON tensors, as the median per-round ratio.

    .venv/bin/python bench/serving.py [--seconds 10] [--rounds 3] [--models resnet18,mlp_bn]
        [--clients 1,16,64] [--contenders bnserve,naive,litserve,noop] [--malloc-off] [--drift]
        [--variant NAME:VAR=VALUE,...] [--env VAR=VALUE] [--threads N] [--images]
        [--json bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import images, report
from bench.contenders.common import UVICORN_OPTIONS
from bench.loadgen import Load, ensure_hey, run_hey
from bench.procs import REPO, Server, Servers, free_port, terminated_on_sigterm
from bench.scrape import scrape, served
from models import get_architecture

TOKEN = "bench-token-0123456789"  # BNSERVE_API_TOKEN needs 16 characters or more
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Model name -> (architecture, config) as issue 8 names them.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet18", {"stem": "cifar"}),
    "mlp_bn": ("mlp_bn", {}),
}

# bnserve tunes glibc's allocator itself at start (service/serving/allocator.py, on by default);
# `--malloc-off` adds bnserve with glibc's defaults, to measure what the tuning buys.
MALLOC_OFF_ENV = {"BNSERVE_MALLOC_TUNING": "false"}
# `--drift` adds bnserve with the input-drift alarm measuring 5% of the batches (issue 15: it must
# cost under 5% of throughput); the report gives `bnserve+drift/bnserve` per client count.
DRIFT_ENV = {"BNSERVE_DRIFT_SAMPLE_RATE": "0.05"}

CONTENDERS = ("bnserve", "naive", "litserve", "noop")
CONTENDER_MODULES = {
    "naive": "bench.contenders.naive_fastapi",
    "litserve": "bench.contenders.litserve_server",
    "noop": "bench.contenders.noop_fastapi",
}


def env_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected VAR=VALUE, got {item!r}")
        pairs[key.strip()] = value
    return pairs


def variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:VAR=VALUE[,VAR=VALUE], got {text!r}")
    return f"bnserve+{name}", env_pairs(rest)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measurement (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before each (2 s)")
    parser.add_argument("--models", default="resnet18,mlp_bn")
    parser.add_argument("--clients", default="1,16,64", help="concurrent clients")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--malloc-off",
        action="store_true",
        help="also bnserve with glibc's default allocator (BNSERVE_MALLOC_TUNING=false)",
    )
    parser.add_argument(
        "--drift",
        action="store_true",
        help="also bnserve with input-drift sampling on (BNSERVE_DRIFT_SAMPLE_RATE=0.05)",
    )
    parser.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        help="also bnserve with this environment, e.g. nobatch:BNSERVE_MAX_BATCH_SIZE=1",
    )
    parser.add_argument(
        "--env", type=env_pairs, action="append", default=[], help="VAR=VALUE for every bnserve"
    )
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads everywhere (OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--images",
        action="store_true",
        help="also 32x32 PNG bodies against the same samples as JSON tensors, on bnserve "
        "(with --models '' only that)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    if args.images and "bnserve" not in args.contenders:
        parser.error("--images measures bnserve: keep bnserve in --contenders")
    if args.malloc_off:
        args.variant.append(("bnserve-malloc", MALLOC_OFF_ENV))
    if args.drift:
        args.variant.append(("bnserve+drift", DRIFT_ENV))
    args.bnserve_env = {k: v for pairs in args.env for k, v in pairs.items()}
    return args


def trained_weights(architecture: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded weights whose BN running statistics moved off their defaults, as trained ones do."""
    arch = get_architecture(architecture)
    parsed = arch.parse_config(config)
    torch.manual_seed(0)
    module = arch.build(parsed).train()
    with torch.no_grad():
        for _ in range(8):
            module(torch.randn(16, *parsed.input_shape()) * 2 + 0.5)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def reference(architecture: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    arch = get_architecture(architecture)
    module = arch.build(arch.parse_config(config))
    module.load_state_dict(state)
    return module.eval()


class Contender:
    """A started server and the URL each model is predicted at."""

    def __init__(self, name: str, server: Server, paths: dict[str, str]) -> None:
        self.name = name
        self.server = server
        self.paths = paths


def start_bnserve(
    name: str, run_dir: Path, env: dict[str, str], common_env: dict[str, str]
) -> Contender:
    port = free_port()
    data_dir = run_dir / name
    data_dir.mkdir()
    server = Server(
        name,
        ["-m", "service"],
        env={
            **common_env,
            "BNSERVE_DATA_DIR": str(data_dir),
            "BNSERVE_PORT": str(port),
            "BNSERVE_API_TOKEN": TOKEN,
            "BNSERVE_WORKERS": "0",
            "BNSERVE_DEMO": "false",
            "BNSERVE_DEVICE": "cpu",
            **env,
        },
        log_path=run_dir / f"{name}.log",
        port=port,
        health_path="/healthz",
    )
    return Contender(name, server, {})


def set_up_bnserve(contender: Contender, models: dict[str, Any]) -> None:
    """Create each model and upload its weights (promoted), through the HTTP contract."""
    url = contender.server.url
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        for name, spec in models.items():
            client.post(
                "/v1/models",
                json={"name": name, "architecture": spec["architecture"], "config": spec["config"]},
            ).raise_for_status()
            with spec["weights"].open("rb") as f:
                answer = client.post(
                    f"/v1/models/{name}/versions", files={"file": (f"{name}.pt", f)}
                )
            answer.raise_for_status()
            if not answer.json().get("serving"):
                raise RuntimeError(f"{contender.name}: uploaded {name} but it is not serving")
            contender.paths[name] = f"/v1/models/{name}/predict"


def check_answers(contender: Contender, models: dict[str, Any]) -> dict[str, float | None]:
    """One request per model: it must answer 200 with the reference outputs (max abs diff)."""
    diffs: dict[str, float | None] = {}
    for name, spec in models.items():
        answer = httpx.post(
            contender.server.url + contender.paths[name],
            content=spec["body"].read_bytes(),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        if answer.status_code != 200:
            raise RuntimeError(
                f"{contender.name} answered {answer.status_code} for {name}: {answer.text[:500]}"
            )
        got = torch.tensor(answer.json()["outputs"], dtype=torch.float32)
        if contender.name == "noop":
            diffs[name] = None  # answers a constant by design
            continue
        diff = float((got - spec["expected"]).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"{contender.name}: {name} outputs differ by {diff:.2e}")
        diffs[name] = diff
    return diffs


def measure_http(
    hey: str, contender: Contender, load: Load, model: str, clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    is_bnserve = contender.name.startswith("bnserve")
    run_hey(hey, load, clients=clients, seconds=args.warmup)
    before = scrape(contender.server.url) if is_bnserve else None
    cpu_before = server_cpu_s(contender.server.pid)
    result = run_hey(hey, load, clients=clients, seconds=args.seconds)
    cpu = server_cpu_s(contender.server.pid) - cpu_before
    if before is not None:
        result.update(served(before, scrape(contender.server.url), model))
    # The server's own CPU per answered request (us): what a feature costs, far steadier on a
    # shared machine than req/s, which also moves with the scheduler and the client.
    answered = result["requests"]
    result["server_cpu_us_per_request"] = 1e6 * cpu / answered if answered else None
    # The drift probe's own CPU as a share of the server's: its cost, free of the machine's drift
    # that moves req/s by 10-20% between rounds (all but the GIL round trips it makes others wait).
    probe = result.pop("drift_cpu_seconds", None)
    result["drift_cpu_share"] = probe / cpu if probe is not None and cpu > 0 else None
    if not contender.server.alive():
        raise RuntimeError(f"{contender.name} died under load:\n{contender.server.log_tail()}")
    return result


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a server process and the processes it started."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = [int(c) for c in children]
    for child in list(found):
        found += _descendants(child)
    return found


def measure_limit(
    server: Server, servers: Servers, model: str, batches: dict[int, int], seconds: float
) -> dict[str, Any]:
    """Batch 1 (the lone client's forward) and each client count's bnserve mean batch."""
    done: dict[int, dict[str, Any]] = {}
    with servers.alone(server), httpx.Client(base_url=server.url, timeout=600) as client:
        for batch in sorted({1, *batches.values()}):
            answer = client.post(
                "/measure", json={"model": model, "batch": batch, "seconds": seconds}
            )
            answer.raise_for_status()
            done[batch] = answer.json()
    return {
        "batch_1": done[1],
        "by_clients": {str(c): done[b] for c, b in batches.items()},
    }


def environment(args: argparse.Namespace, hey: str) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def command(*argv: str) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
        except OSError:
            return None
        return done.stdout.strip() or None

    return {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": command("git", "rev-parse", "HEAD"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "bench_torch_threads": torch.get_num_threads(),
        "packages": {
            d: version(d) for d in ("fastapi", "starlette", "uvicorn", "pydantic", "litserve")
        },
        "uvloop": importlib.util.find_spec("uvloop") is not None,
        "httptools": importlib.util.find_spec("httptools") is not None,
        "contender_uvicorn_options": UVICORN_OPTIONS,
        "hey": {"path": hey, "version": command("dpkg-query", "-W", "-f=${Version}", "hey")},
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "clients": args.clients,
        "bnserve_env": args.bnserve_env,
        "variants": dict(args.variant),
        "threads": args.threads,
        "images": args.images,
    }


def prepare_models(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Per model: weights saved once for every contender, the body and its expected outputs."""
    models: dict[str, Any] = {}
    for name in args.models:
        architecture, config = MODELS.get(name, (name, {}))
        state = trained_weights(architecture, config)
        weights = run_dir / f"{name}.pt"
        torch.save(state, weights)
        shape = tuple(get_architecture(architecture).parse_config(config).input_shape())
        torch.manual_seed(1)
        # Six decimals, so the body has a realistic size (about 9 characters a number); float64
        # values print as such and the servers' float32 conversion is the same as ours.
        values = torch.rand(1, *shape, dtype=torch.float64).round(decimals=6)
        body = run_dir / f"{name}.json"
        body.write_bytes(json.dumps({"inputs": values.tolist()}).encode())
        x = values.float()
        with torch.inference_mode():
            expected = reference(architecture, config, state)(x)
        models[name] = {
            "architecture": architecture,
            "config": config,
            "weights": weights,
            "body": body,
            "expected": expected,
        }
    listing = [
        {"name": n, **{k: m[k] for k in ("architecture", "config")}, "weights": str(m["weights"])}
        for n, m in models.items()
    ]
    (run_dir / "models.json").write_text(json.dumps(listing))
    return models


def start_contenders(
    args: argparse.Namespace, run_dir: Path, models: dict[str, Any], common_env: dict[str, str]
) -> list[Contender]:
    contenders: list[Contender] = []
    for name in args.contenders:
        if name == "bnserve":
            contenders.append(start_bnserve(name, run_dir, args.bnserve_env, common_env))
            for variant_name, env in args.variant:
                contenders.append(
                    start_bnserve(variant_name, run_dir, {**args.bnserve_env, **env}, common_env)
                )
            continue
        if name == "litserve" and importlib.util.find_spec("litserve") is None:
            print("litserve is not installed (pip install -e '.[bench]'): skipping it")
            continue
        port = free_port()
        argv = ["-m", CONTENDER_MODULES[name], "--port", str(port)]
        server = Server(
            name,
            [*argv, "--models-file", str(run_dir / "models.json")],
            env=common_env,
            log_path=run_dir / f"{name}.log",
            port=port,
            health_path="/health" if name == "litserve" else "/healthz",
        )
        contenders.append(Contender(name, server, {m: f"/predict/{m}" for m in models}))
    return contenders


def measure_round(
    index: int,
    args: argparse.Namespace,
    hey: str,
    contenders: list[Contender],
    limit_server: Server,
    servers: Servers,
    models: dict[str, Any],
) -> dict[str, Any]:
    """Every contender at every client count, each alone, in a rotated order; then the limit."""
    shift = index % len(contenders)
    order = contenders[shift:] + contenders[:shift]
    result: dict[str, Any] = {"round": index, "order": [c.name for c in order], "models": {}}
    for model, spec in models.items():
        http: dict[str, dict[str, Any]] = {c.name: {} for c in contenders}
        for contender in order:
            load = Load(contender.server.url + contender.paths[model], spec["body"])
            with servers.alone(contender.server):
                for clients in args.clients:
                    row = measure_http(hey, contender, load, model, clients, args)
                    http[contender.name][str(clients)] = row
                    print(
                        f"round {index + 1}/{args.rounds} {model:9} {contender.name:16} "
                        f"c={clients:<3} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                        f"non-2xx {row['non_2xx']}",
                        flush=True,
                    )
        servers.pause_all()
        bnserve = http.get("bnserve")
        batches = {
            c: max(1, round(bnserve[str(c)].get("mean_batch") or 1)) if bnserve else c
            for c in args.clients
        }
        result["models"][model] = {
            "http": http,
            "limit": measure_limit(limit_server, servers, model, batches, args.seconds),
        }
    return result


def measure_images(
    index: int,
    args: argparse.Namespace,
    hey: str,
    contender: Contender,
    servers: Servers,
    loads: dict[str, Load],
) -> dict[str, dict[str, Any]]:
    """The PNG and tensor bodies at every client count, alternating, bnserve alone."""
    result: dict[str, dict[str, Any]] = {}
    with servers.alone(contender.server):
        for clients in args.clients:
            result[str(clients)] = {}
            for kind in images.round_order(index):
                row = measure_http(hey, contender, loads[kind], images.MODEL, clients, args)
                result[str(clients)][kind] = row
                print(
                    f"round {index + 1}/{args.rounds} {images.MODEL:9} {kind:16} "
                    f"c={clients:<3} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                    f"non-2xx {row['non_2xx']}",
                    flush=True,
                )
    servers.pause_all()
    return result


def run(args: argparse.Namespace, run_dir: Path, servers: Servers) -> dict[str, Any]:
    hey = ensure_hey()
    common_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    meta = environment(args, hey)
    models = prepare_models(args, run_dir)
    image_spec = images.prepare(run_dir, trained_weights) if args.images else None
    port = free_port()
    models_file = str(run_dir / "models.json")
    limit_server = servers.add(
        Server(
            "limit",
            [
                "-m",
                "bench.contenders.limit_server",
                "--port",
                str(port),
                "--models-file",
                models_file,
            ],
            env=common_env,
            log_path=run_dir / "limit.log",
            port=port,
            health_path="/healthz",
        )
    )
    contenders = start_contenders(args, run_dir, models, common_env)
    for contender in contenders:
        servers.add(contender.server)
    limit_server.wait_ready()
    limit_server.pause()
    checks = {}
    for contender in contenders:
        contender.server.wait_ready()
        if contender.name.startswith("bnserve"):
            set_up_bnserve(contender, models)
        if contender.name == "bnserve" and image_spec is not None:
            images.set_up(contender.server.url, AUTH, image_spec)
        checks[contender.name] = check_answers(contender, models)
        contender.server.pause()
        print(f"{contender.name} ready (pid {contender.server.pid}), answers checked", flush=True)

    bnserve = next(c for c in contenders if c.name == "bnserve") if image_spec else None
    rounds, image_rounds = [], []
    for index in range(args.rounds):
        rounds.append(measure_round(index, args, hey, contenders, limit_server, servers, models))
        if bnserve is not None and image_spec is not None:
            loads = images.loads(bnserve.server.url, image_spec)
            image_rounds.append(measure_images(index, args, hey, bnserve, servers, loads))
    meta["load_average_at_end"] = os.getloadavg()
    per_round = [report.round_ratios(r) for r in rounds]
    ratios = report.median_ratios(per_round)
    return {
        "meta": meta,
        "answer_checks_max_abs_diff": checks,
        "rounds": rounds,
        "medians": report.medians(rounds),
        "ratios": {"per_round": per_round, "median": ratios},
        "targets": report.targets(ratios),
        "images": images.summarize(image_rounds) if image_rounds else None,
    }


def main() -> None:
    args = parse_args()
    servers = Servers()
    started = time.monotonic()
    with terminated_on_sigterm(), tempfile.TemporaryDirectory(prefix="bnserve-bench-") as tmp:
        try:
            summary = run(args, Path(tmp), servers)
        except KeyboardInterrupt:
            raise SystemExit("interrupted: every server stopped, nothing written") from None
        finally:
            servers.stop_all()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    title = (
        f"medians of {args.rounds} round(s) x {args.seconds:g} s per measurement, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print()
    print(report.table(summary, title))
    if summary["images"] is not None:
        print(images.table(summary["images"]))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
