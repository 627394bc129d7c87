"""The ``boxvm`` command line: a thin layer over the async Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

import boxvm
from boxvm.backends.base import Backend
from boxvm.errors import BoxNotFound, BoxvmError, InvalidArgument, SnapshotNotFound, printable
from boxvm.paths import Home

# No markup: what they print includes names, paths and error messages a box, a registry or
# a server wrote (a "[/x]" in one made Rich raise, a "[link=...]" made a hyperlink); that
# text is shown ``printable`` (not an exec's output or a console log: the box's own streams,
# as with docker).
err = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(soft_wrap=True, markup=False)


def fail(message: str, code: str | None = None) -> NoReturn:
    """Print an error the way every command does and exit 1."""
    err.print(Text("error", style="red"), Text(f" ({code}): " if code else ": ") + printable(message), sep="")
    sys.exit(1)


def progress_printer(interactive: bool = False) -> Callable[[str], None]:
    """Long first-run work: a live status line on a terminal, plain lines otherwise. The
    live line starts with the first message, and never for an interactive terminal session
    (its spinner would draw over the user's shell)."""
    if err.is_terminal and not interactive:
        status = err.status("")

        def show(message: str) -> None:
            status.update(Text(printable(message)))  # (a status line parses markup of its own)
            status.start()  # once: later calls do nothing
            if message.endswith("ready") or "ready in" in message:
                err.log(message)

        show.stop = status.stop  # type: ignore[attr-defined]
        return show
    return lambda message: print(f"boxvm: {message}", file=sys.stderr, flush=True)


def run_async(fn: Callable[..., Coroutine[Any, Any, int | None]]) -> Callable[..., None]:
    """Run a command coroutine with a Runtime; errors become one clear line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> int | None:
            from boxvm.backends.local import LocalBackend

            show = progress_printer(interactive=bool(kwargs.get("tty")))
            remote = click.get_current_context().find_root().params.get("remote")
            if remote:
                from boxvm.backends.remote import RemoteBackend

                root = click.get_current_context().find_root().params
                backend: Backend = RemoteBackend(remote, root.get("token"), ca_bundle=root.get("ca_bundle"))
            else:
                backend = LocalBackend(Home.default(), progress=show)
            try:
                async with boxvm.Runtime(backend=backend) as rt:
                    return await fn(rt, *args, **kwargs)
            finally:
                getattr(show, "stop", lambda: None)()

        try:
            code = asyncio.run(main())
        except BoxvmError as exc:
            fail(exc.message, exc.code)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper


async def must_get(rt: boxvm.Runtime, ref: str) -> boxvm.Box:
    box = await rt.get(ref)
    if box is None:
        raise BoxNotFound(f"no box named or with id {ref!r}: `boxvm ls` lists them")
    return box


def parse_env(items: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            value = os.environ.get(key, "")
        env[key] = value
    return env


def parse_ports(items: tuple[str, ...]) -> list[tuple[int, int]]:
    ports = []
    for item in items:
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise InvalidArgument(f"port {item!r}: use HOST:GUEST, e.g. 8080:80")
        ports.append((int(host), int(guest)))
    return ports


def info_dict(info: boxvm.BoxInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["status"] = info.status.value
    return data


box_options = [
    click.option("--name", help="Box name (default: box-<id>)."),
    click.option("--image", help="Registry reference, OCI layout directory or archive (default: built-in)."),
    click.option("--cpus", type=int, default=1, show_default=True),
    click.option("--memory", "memory_mib", type=int, default=512, show_default=True, help="MiB of RAM."),
    click.option("--disk", "disk_size_gb", type=int, default=4, show_default=True, help="GiB of disk."),
    click.option("-e", "--env", multiple=True, help="KEY=VALUE for every exec in the box."),
    click.option("-p", "--publish", multiple=True, help="HOST:GUEST TCP port forwarding (on 127.0.0.1)."),
    click.option("--network", type=click.Choice(["nat", "none"]), default="nat", show_default=True),
    click.option("-w", "--workdir"),
    click.option("-u", "--user"),
]


def with_box_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(box_options):
        fn = option(fn)
    return fn


def make_options(kw: dict[str, Any]) -> boxvm.BoxOptions:
    return boxvm.BoxOptions(
        image=kw["image"],
        cpus=kw["cpus"],
        memory_mib=kw["memory_mib"],
        disk_size_gb=kw["disk_size_gb"],
        env=parse_env(kw["env"]),
        ports=parse_ports(kw["publish"]),
        network=kw["network"],
        workdir=kw["workdir"],
        user=kw["user"],
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(boxvm.__version__)
@click.option("--remote", envvar="BOXVM_REMOTE", metavar="URL", help="Drive a `boxvm serve` server, not this host.")
@click.option(
    "--token",
    envvar="BOXVM_TOKEN",
    help="Bearer token for --remote (and for `serve`). Default for a loopback --remote: the home's server-token.",
)
@click.option(
    "--ca-bundle",
    envvar="BOXVM_CA_BUNDLE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificates (PEM) to verify an https --remote with (default: the system's, or SSL_CERT_FILE).",
)
def cli(remote: str | None, token: str | None, ca_bundle: Path | None) -> None:
    """boxvm: micro-VM sandboxes with first-class state."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8100, show_default=True, type=int, help="Port (0: any free one, announced).")
@click.option("--no-token", is_flag=True, help="No authentication (loopback only; browsers' requests refused).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM private key.")
@click.option(
    "--allow-image-dir",
    "image_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A directory whose OCI layouts/archives clients may name as images (repeatable; default: none).",
)
@click.option(
    "--port-range",
    envvar="BOXVM_SERVE_PORT_RANGE",
    metavar="LOW-HIGH",
    help="Host ports clients may forward to their boxes (default: none).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    no_token: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    image_dirs: tuple[Path, ...],
    port_range: str | None,
) -> None:
    """Serve this host's boxes over REST (/v1). The token is --token, BOXVM_TOKEN or one
    generated in the home (server-token, 0600); --no-token only on loopback."""
    from boxvm.server.guard import parse_port_range
    from boxvm.server.run import ServeOptions
    from boxvm.server.run import serve as run_server

    try:
        options = ServeOptions(
            host=host,
            port=port,
            token=ctx.find_root().params.get("token") or None,
            no_token=no_token,
            tls_cert=tls_cert,
            tls_key=tls_key,
            image_dirs=tuple(image_dirs),
            port_range=parse_port_range(port_range) if port_range else None,
        )
        run_server(options, lambda line: print(line, flush=True))
    except BoxvmError as exc:
        fail(exc.message, exc.code)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--refresh", is_flag=True, help="Rebuild the images if the host's apt lists have newer packages.")
@click.option("--with-build-tools", is_flag=True, help="Add build-essential and python3-dev to the default image.")
@click.option("--no-template", is_flag=True, help="Skip the default image's warm-start template (one cold boot).")
def setup(refresh: bool, with_build_tools: bool, no_template: bool) -> None:
    """Build the guest bundle and the built-in images (once; needs apt package lists), then
    the default image's warm-start template: first starts of default boxes resume it."""
    from boxvm.guest import bundle
    from boxvm.images.default import ensure_default, ensure_slim, info

    home = Home.default()
    show = progress_printer()
    try:
        b = bundle.ensure(home, show)
        layouts = {
            "boxvm/default": ensure_default(home, show, refresh=refresh, build_tools=with_build_tools),
            "boxvm/slim": ensure_slim(home, show, refresh=refresh),
        }
    except BoxvmError as exc:
        fail(exc.message)
    finally:
        getattr(show, "stop", lambda: None)()
    out.print(f"guest bundle {b.id} (kernel {b.kernel_version})")
    for ref, layout in layouts.items():
        built = info(layout)
        out.print(
            f"{ref}: {built.get('layer_bytes', 0) / 1e6:.0f} MB, {len(built.get('packages', []))} packages,"
            f" built in {built.get('build_seconds', 0):.0f} s ({layout.name})"
        )
    if not no_template:
        _default_template(home)


def _default_template(home: Home) -> None:
    """Boot a default box cold and keep it, suspended at agent-ready, as the template."""
    from boxvm.backends.local import LocalBackend

    async def make() -> None:
        async with boxvm.Runtime(backend=LocalBackend(home)) as rt:
            t0 = time.monotonic()
            made = await rt.templates.create(boxvm.BoxOptions())
            out.print(
                f"warm-start template {made.id} ({made.memory_mib} MiB, {made.cpus} CPU):"
                f" {made.size_bytes / 1e6:.0f} MB, made in {time.monotonic() - t0:.0f} s"
            )

    try:
        asyncio.run(make())
    except BoxvmError as exc:
        fail(f"{exc.message} (boxes boot cold; `boxvm setup --no-template` skips this)")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--repair", is_flag=True, help="Fix layer counts and delete layers nothing can reach.")
def doctor(as_json: bool, repair: bool) -> None:
    """Check QEMU, acceleration, the guest bundle, the home directory and its layers
    (a full scan of every disk chain against the store's layer references)."""
    import shutil
    import subprocess

    from boxvm.engine.accel import detect
    from boxvm.guest import bundle

    home = Home.default()
    checks: list[tuple[str, bool, str]] = []
    qemu = shutil.which("qemu-system-x86_64")
    version = ""
    if qemu:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    checks.append(("qemu", bool(qemu), version or "qemu-system-x86_64 not found: run the set-up command"))
    for tool in ("qemu-img", "mke2fs", "fakeroot", "dpkg-deb"):
        checks.append((tool, bool(shutil.which(tool)), shutil.which(tool) or "missing"))
    acc = detect()
    checks.append(("acceleration", True, f"{acc.name}: {acc.reason}"))
    found = bundle.find(home)
    checks.append(
        ("guest bundle", found is not None, f"{found.id} ({found.kernel_version})" if found else "run `boxvm setup`")
    )
    writable = os.access(home.root if home.root.exists() else home.root.parent, os.W_OK)
    checks.append(("home", writable, str(home.root)))
    if home.root.exists():
        checks.append(("layers", *_layer_check(home, repair)))
    if as_json:
        print(json.dumps([{"check": c, "ok": ok, "detail": d} for c, ok, d in checks], indent=2))
    else:
        for name, ok, detail in checks:
            mark = Text(f"{'ok' if ok else 'FAIL':>4}", style="green" if ok else "red")
            out.print(mark, f" {name:<13} {printable(detail)}", highlight=False)
    sys.exit(0 if all(ok for _n, ok, _d in checks) else 1)


def _layer_check(home: Home, repair: bool) -> tuple[bool, str]:
    from boxvm.backends.local import LocalBackend

    backend = LocalBackend(home)
    try:
        scan = backend.check_layers(repair)
    finally:
        asyncio.run(backend.close())
    found = {
        "unreadable chains": scan.unreadable, "orphaned layers": scan.orphans, "unrecorded layers": scan.adopted,
        "missing layer files": scan.missing, "pending deletions": scan.tombstoned, "miscounted layers": scan.miscounted,
    }  # fmt: skip
    problems = ", ".join(f"{len(v)} {k}" for k, v in found.items() if v)
    if not problems:
        return True, "references match every chain"
    if repair:
        kept = " (nothing deleted: a chain could not be read)" if scan.unreadable else ""
        return not scan.unreadable, f"repaired {problems}; deleted {len(scan.deleted)}{kept}"
    return False, f"{problems}: run `boxvm doctor --repair`"


@cli.command()
@with_box_options
@run_async
async def create(rt: boxvm.Runtime, **kw: Any) -> None:
    """Create a box (not started)."""
    box = await rt.create(make_options(kw), name=kw["name"])
    out.print(box.id)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@with_box_options
@click.option("--rm", is_flag=True, help="Remove the box when the command ends.")
@click.option("-d", "--detach", is_flag=True, help="Leave the box running; run nothing.")
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", is_flag=True)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@run_async
async def run(
    rt: boxvm.Runtime, command: tuple[str, ...], rm: bool, detach: bool, interactive: bool, tty: bool, **kw: Any
) -> int:
    """Create and start a box and run COMMAND in it, or the image's default command
    (Entrypoint + Cmd); with --detach, leave it running instead."""
    box = await rt.create(make_options(kw), name=kw["name"])
    try:
        info = await box.start()
        argv = command_argv(command) or info.command
        if detach or not argv:
            out.print(box.id)
            return 0
        return await stream_exec(box, argv, {}, None, None, interactive, tty)
    finally:
        if rm:
            await rt.remove(box.id, force=True)


@cli.command()
@click.argument("box")
@run_async
async def start(rt: boxvm.Runtime, box: str) -> None:
    """Start a box."""
    b = await must_get(rt, box)
    info = await b.start()
    err.print(f"started {info.name} in {info.timings.get('start_ms', 0) / 1000:.1f} s", highlight=False)


@cli.command()
@click.argument("box")
@click.option("-t", "--timeout", type=float, default=10.0, show_default=True)
@run_async
async def stop(rt: boxvm.Runtime, box: str, timeout: float) -> None:
    """Stop a box cleanly (the guest syncs and unmounts first)."""
    await (await must_get(rt, box)).stop(timeout)


@cli.command()
@click.argument("box")
@run_async
async def pause(rt: boxvm.Runtime, box: str) -> None:
    """Pause a running box (memory kept)."""
    await (await must_get(rt, box)).pause()


@cli.command()
@click.argument("box")
@run_async
async def resume(rt: boxvm.Runtime, box: str) -> None:
    """Resume a paused box."""
    await (await must_get(rt, box)).resume()


@cli.command()
@click.argument("box")
@run_async
async def suspend(rt: boxvm.Runtime, box: str) -> None:
    """Save a box's memory with it and stop its VM; `boxvm start` resumes its processes."""
    await (await must_get(rt, box)).suspend()


async def stream_exec(
    box: boxvm.Box,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    interactive: bool,
    tty: bool,
) -> int:
    """Run argv with the terminal attached: output streamed, stdin forwarded, signals passed on."""
    size = None
    if tty:
        cols, rows = os.get_terminal_size() if sys.stdin.isatty() else (80, 24)
        size = (rows, cols)
    proc = await box.spawn(argv, env=env, cwd=cwd, user=user, tty=tty, size=size)
    loop = asyncio.get_running_loop()

    async def pump(stream: Any, sink: Any) -> None:
        async for chunk in stream:
            sink.write(chunk)
            sink.flush()

    async def feed() -> None:
        if not interactive:
            proc.close_stdin()
            return
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while data := await reader.read(65536):
            await proc.write(data)
        proc.close_stdin()

    old_tty = None
    if tty and sys.stdin.isatty():
        import termios
        import tty as ttymod

        old_tty = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
        loop.add_signal_handler(
            signal.SIGWINCH,
            lambda: proc.resize(*reversed(os.get_terminal_size())),  # type: ignore[arg-type]
        )
    else:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, proc.signal, sig)
    feeder = asyncio.create_task(feed())
    try:
        await asyncio.gather(pump(proc.stdout, sys.stdout.buffer), pump(proc.stderr, sys.stderr.buffer))
        code = await proc.wait()
    finally:
        feeder.cancel()
        if old_tty is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old_tty)
    return code


@cli.command(name="exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("-e", "--env", multiple=True)
@click.option("-w", "--workdir")
@click.option("-u", "--user")
@click.argument("box")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@run_async
async def exec_(
    rt: boxvm.Runtime,
    box: str,
    command: tuple[str, ...],
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
) -> int:
    """Run COMMAND in a running box; exits with its exit code."""
    b = await must_get(rt, box)
    argv = command_argv(command)
    if not argv:
        raise InvalidArgument("no command given: boxvm exec BOX [--] COMMAND [ARG...]")
    return await stream_exec(b, argv, parse_env(env), workdir, user, interactive, tty)


def command_argv(command: tuple[str, ...]) -> list[str]:
    """COMMAND as given, without the ``--`` that may separate it from boxvm's own options
    (click keeps it once a positional argument such as BOX has been seen)."""
    return list(command[1:] if command[:1] == ("--",) else command)


def _listing(
    items: list[Any],
    as_json: bool,
    to_dict: Callable[[Any], dict[str, Any]],
    columns: tuple[str, ...],
    row: Callable[[Any], list[str]],
) -> None:
    """Every ``ls`` verb's output: the records as JSON for scripts, or one table row each."""
    if as_json:
        print(json.dumps([to_dict(i) for i in items], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in columns:
        table.add_column(col)
    for item in items:
        table.add_row(*(printable(cell) for cell in row(item)))
    out.print(table)


@cli.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def ls(rt: boxvm.Runtime, as_json: bool) -> None:
    """List boxes."""

    def row(i: boxvm.BoxInfo) -> list[str]:
        age = time.time() - i.created_at
        created = (
            f"{int(age // 60)} min ago" if age < 3600 else time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at))
        )
        ports = ", ".join(f"127.0.0.1:{h}->{g}" for h, g in i.ports)
        return [i.id[:12], i.name, i.status.value, i.image, created, ports]

    _listing(await rt.list(), as_json, info_dict, ("ID", "NAME", "STATUS", "IMAGE", "CREATED", "PORTS"), row)


cli.add_command(ls, name="ps")


@cli.command()
@click.argument("box")
@run_async
async def inspect(rt: boxvm.Runtime, box: str) -> None:
    """Show everything about a box as JSON."""
    print(json.dumps(info_dict(await (await must_get(rt, box)).info()), indent=2))


@cli.command()
@click.argument("boxes", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Stop it first if it is running.")
@run_async
async def rm(rt: boxvm.Runtime, boxes: tuple[str, ...], force: bool) -> None:
    """Remove boxes and their files."""
    for ref in boxes:
        await rt.remove(ref, force=force)
        out.print(ref)


@cli.command()
@click.argument("box")
@click.option("-n", "--tail", type=int, default=0, help="Only the last N lines.")
@run_async
async def logs(rt: boxvm.Runtime, box: str, tail: int) -> None:
    """Print the box's console log."""
    text = await (await must_get(rt, box)).logs()
    lines = text.splitlines()
    print("\n".join(lines[-tail:] if tail else lines))


@cli.command()
@click.argument("src")
@click.argument("dest")
@run_async
async def cp(rt: boxvm.Runtime, src: str, dest: str) -> None:
    """Copy files: `boxvm cp ./dir BOX:/path` or `boxvm cp BOX:/path ./dir`."""
    src_box, _, src_path = src.partition(":") if ":" in src and not src.startswith(("/", ".")) else ("", "", src)
    dst_box, _, dst_path = dest.partition(":") if ":" in dest and not dest.startswith(("/", ".")) else ("", "", dest)
    if bool(src_box) == bool(dst_box):
        raise InvalidArgument("exactly one of SRC and DEST must be BOX:/path")
    if src_box:
        await (await must_get(rt, src_box)).copy_out(src_path, Path(dst_path))
    else:
        await (await must_get(rt, dst_box)).copy_in(Path(src_path), dst_path)


@cli.group()
def snapshot() -> None:
    """Snapshots of a box's disk: create, ls, inspect, restore, rm."""


def snapshot_dict(info: boxvm.SnapshotInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


@snapshot.command(name="create")
@click.argument("box")
@click.argument("name")
@click.option("--no-quiesce", is_flag=True, help="Do not freeze the guest filesystem (crash-consistent).")
@click.option("--quiesce-timeout", type=float, default=30.0, show_default=True)
@click.option("--allow-crash-consistent", is_flag=True, help="If the freeze fails, capture anyway.")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def snapshot_create(
    rt: boxvm.Runtime,
    box: str,
    name: str,
    no_quiesce: bool,
    quiesce_timeout: float,
    allow_crash_consistent: bool,
    as_json: bool,
) -> None:
    """Snapshot BOX as NAME (running boxes keep running)."""
    options = boxvm.SnapshotOptions(
        quiesce=not no_quiesce, quiesce_timeout_secs=quiesce_timeout, stop_on_quiesce_fail=not allow_crash_consistent
    )
    info = await (await must_get(rt, box)).snapshot.create(name, options)
    if as_json:
        print(json.dumps(snapshot_dict(info), indent=2))
    else:
        pause = info.timings.get("pause_ms", 0)
        out.print(f"{info.name} ({info.consistency}, guest pause {pause:.1f} ms)", highlight=False)


@snapshot.command(name="ls")
@click.argument("box")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def snapshot_ls(rt: boxvm.Runtime, box: str, as_json: bool) -> None:
    """List BOX's snapshots."""
    _listing(
        await (await must_get(rt, box)).snapshot.list(),
        as_json,
        snapshot_dict,
        ("NAME", "CREATED", "CONSISTENCY", "OWN SIZE", "DISK"),
        lambda s: [
            s.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at)),
            s.consistency,
            _size(s.size_bytes),
            _size(s.container_disk_bytes),
        ],
    )


@snapshot.command(name="inspect")
@click.argument("box")
@click.argument("name")
@run_async
async def snapshot_inspect(rt: boxvm.Runtime, box: str, name: str) -> None:
    """Show one snapshot as JSON."""
    info = await (await must_get(rt, box)).snapshot.get(name)
    if info is None:
        raise SnapshotNotFound(f"box {box!r} has no snapshot named {name!r}")
    print(json.dumps(snapshot_dict(info), indent=2))


@snapshot.command(name="restore")
@click.argument("box")
@click.argument("name")
@run_async
async def snapshot_restore(rt: boxvm.Runtime, box: str, name: str) -> None:
    """Return stopped BOX's disk to snapshot NAME."""
    await (await must_get(rt, box)).snapshot.restore(name)


@snapshot.command(name="rm")
@click.argument("box")
@click.argument("names", nargs=-1, required=True)
@run_async
async def snapshot_rm(rt: boxvm.Runtime, box: str, names: tuple[str, ...]) -> None:
    """Remove snapshots (space returns once nothing else shares their layers)."""
    b = await must_get(rt, box)
    for name in names:
        await b.snapshot.remove(name)


@cli.command()
@click.argument("box")
@click.option("--name", "names", multiple=True, help="Name of a clone (repeat with --count).")
@click.option("--count", type=int, default=1, show_default=True)
@click.option("--from-snapshot", help="Clone this snapshot instead of the current state.")
@click.option("--full", is_flag=True, help="An independent full copy instead of copy-on-write.")
@click.option("--start", is_flag=True, help="Resume the clones from the memory snapshot in --from-snapshot (forks).")
@run_async
async def clone(
    rt: boxvm.Runtime, box: str, names: tuple[str, ...], count: int, from_snapshot: str | None, full: bool, start: bool
) -> None:
    """Fork BOX (running or not) into COUNT new boxes sharing one capture."""
    if names and len(names) != count and count != 1:
        raise InvalidArgument("give --name once per clone, or not at all")
    count = len(names) or count
    options = boxvm.CloneOptions(cow=not full, start_after_clone=start, from_snapshot=from_snapshot)
    clones = await (await must_get(rt, box)).clone_many(count, options, list(names) or None)
    for c in clones:
        out.print(f"{c.name} {c.id}", highlight=False)


@cli.command()
@click.argument("box")
@click.argument("dest")  # a path, or an s3://bucket/key URL (a click.Path would fold its //)
@click.option("--no-compress", is_flag=True, help="Plain tar instead of zstd.")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstd level.")
@click.option("--no-metadata", is_flag=True, help="Leave the box options out of the manifest.")
@run_async
async def export(rt: boxvm.Runtime, box: str, dest: str, no_compress: bool, level: int, no_metadata: bool) -> None:
    """Write BOX (running or not) to a verified .boxsnap archive (DEST: a file, a directory,
    or a new s3://bucket/key object; credentials and endpoint the standard AWS way)."""
    options = boxvm.ExportOptions(compress=not no_compress, compression_level=level, include_metadata=not no_metadata)
    path = await (await must_get(rt, box)).export(dest, options)
    out.print(str(path), highlight=False)


@cli.command()
@click.argument("box")
@click.option("--to", "to", required=True, metavar="URL", help="The target runner (`boxvm serve`).")
@click.option("--to-token", envvar="BOXVM_TO_TOKEN", help="The target's token (default: BOXVM_TO_TOKEN).")
@click.option(
    "--via", metavar="s3://BUCKET/PREFIX/", help="Go through objects both runners reach (default: stream directly)."
)
@click.option("--release", is_flag=True, help="Give up this home's unfinished move of BOX while BOX is still here.")
@click.option(
    "--force", is_flag=True, help="With --release: let BOX go from a move driven elsewhere (known to be given up)."
)
@run_async
async def migrate(
    rt: boxvm.Runtime, box: str, to: str, to_token: str | None, via: str | None, release: bool, force: bool
) -> None:
    """Move BOX (stopped, suspended or running: it resumes there) to another runner, its
    archive streamed into the target's import, or through object storage with --via.
    Journaled: after a crash, run the same command again to finish the move. The box is
    held for one move at a time: --release gives one up and lets another begin."""
    from boxvm import migrate as moves

    if force and not release:
        raise click.UsageError("--force goes with --release")
    if release and via:
        raise click.UsageError("--release takes no --via: the journal says how the move went")
    async with boxvm.Runtime.remote(to, to_token) as target:
        if release:
            await moves.release(rt.backend, box, target.backend, force=force)
            out.print(f"{box}: released", highlight=False)
            return
        info = await moves.migrate(rt.backend, box, target.backend, via)
    out.print(f"{info.name} {info.id}", highlight=False)


@cli.command(name="import")
@click.argument("archive")  # a path, or an s3://bucket/key URL
@click.option("--name", help="Name of the new box (default: the archive's).")
@click.option(
    "--trusted", is_flag=True, help="Keep the archive's host-specific options (ports) and resources as they are."
)
@run_async
async def import_(rt: boxvm.Runtime, archive: str, name: str | None, trusted: bool) -> None:
    """Create a box from an archive, verified completely before the box appears. Unless
    --trusted, its ports are dropped and its CPUs and memory clamped to this host's."""
    box = await rt.import_box(archive, name, untrusted=not trusted)
    out.print(f"{box.name} {box.id}", highlight=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@run_async
async def df(rt: boxvm.Runtime, as_json: bool) -> None:
    """Disk space per box and snapshot: held alone and shared through common layers."""
    usage = await rt.disk_usage()
    if as_json:
        print(json.dumps(dataclasses.asdict(usage), indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("KIND", "NAME", "OWN", "SHARED"):
        table.add_column(col)
    for kind, rows in (("box", usage.boxes), ("snapshot", usage.snapshots)):
        for name, (own, shared) in sorted(rows.items()):
            table.add_row(kind, name, _size(own), _size(shared))
    out.print(table)
    out.print(f"layer store total: {_size(usage.layers_bytes)}", highlight=False)


@cli.group()
def image() -> None:
    """Images from registries, cached by digest and shared by boxes."""


@image.command(name="pull")
@click.argument("reference")
@click.option("--username", "-u", help="Registry user (default: BOXVM_REGISTRY_USERNAME or docker config.json).")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP to this (non-loopback) registry.")
@run_async
async def image_pull(
    rt: boxvm.Runtime, reference: str, username: str | None, password_stdin: bool, insecure: bool
) -> None:
    """Pull REFERENCE (e.g. alpine:3.20, host:5000/team/app@sha256:...)."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    info = await rt.images.pull(reference, username=username, password=password, insecure=insecure)
    print(f"{info.reference} {info.digest}")


@image.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def image_ls(rt: boxvm.Runtime, as_json: bool) -> None:
    """Cached images."""
    _listing(
        await rt.images.list(),
        as_json,
        dataclasses.asdict,
        ("REFERENCE", "DIGEST", "SIZE"),
        lambda i: [i.reference, i.digest[:19], _size(i.size_bytes)],
    )


@cli.group()
def template() -> None:
    """Warm-start templates: a first start of a box of the same machine resumes one."""


@template.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def template_ls(rt: boxvm.Runtime, as_json: bool) -> None:
    """Templates of this host."""
    _listing(
        await rt.templates.list(),
        as_json,
        dataclasses.asdict,
        ("ID", "IMAGE", "CPUS", "MEMORY", "NETWORK", "SIZE"),
        lambda t: [t.id, t.image, str(t.cpus), f"{t.memory_mib} MiB", t.network, _size(t.size_bytes)],
    )


@template.command(name="create")
@click.option("--image", help="Registry reference, OCI layout directory or archive (default: built-in).")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", "memory_mib", type=int, default=512, show_default=True, help="MiB of RAM.")
@click.option("--disk", "disk_size_gb", type=int, default=4, show_default=True, help="GiB of disk.")
@click.option("--network", type=click.Choice(["nat", "none"]), default="nat", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def template_create(
    rt: boxvm.Runtime, image: str | None, cpus: int, memory_mib: int, disk_size_gb: int, network: str, as_json: bool
) -> None:
    """Make (or remake) the template of a machine: one cold boot, suspended at agent-ready."""
    options = boxvm.BoxOptions(
        image=image, cpus=cpus, memory_mib=memory_mib, disk_size_gb=disk_size_gb, network=network
    )
    made = await rt.templates.create(options)
    if as_json:
        print(json.dumps(dataclasses.asdict(made)))
    else:
        print(made.id)


@template.command(name="rm")
@click.argument("template_id")
@run_async
async def template_rm(rt: boxvm.Runtime, template_id: str) -> None:
    """Remove a template (boxes resumed from it keep running; new ones boot cold)."""
    await rt.templates.remove(template_id)


@image.command(name="rm")
@click.argument("reference")
@run_async
async def image_rm(rt: boxvm.Runtime, reference: str) -> None:
    """Remove a cached image (refused while a box uses it)."""
    await rt.images.remove(reference)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        cli()


if __name__ == "__main__":
    main()
