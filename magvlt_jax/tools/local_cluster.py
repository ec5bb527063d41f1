"""Rehearse a multi-host (pod) job on one machine: N local processes of `magvlt_jax.main`, joined by
`jax.distributed.initialize` on a localhost coordinator, each with its own fake CPU devices and
gloo CPU collectives.

  python -m magvlt_jax.tools.local_cluster --processes=2 --devices_per_process=2 -- \\
      --config=configs/magvlt.py:tiny --workdir=/tmp/pod [--config.x=...]

Everything after `--` goes to magvlt_jax.main unchanged (plus --config.mesh.distributed=True).
Each process's output is printed with a `[pK]` prefix. If one process fails, the others are
stopped and the launcher exits with that process's status.
"""
import argparse
import os
import socket
import subprocess
import sys
import threading


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _parse(argv):
  if "--" not in argv:
    raise SystemExit("local_cluster: put magvlt_jax.main's arguments after `--`, e.g. "
                     "--processes=2 -- --config=configs/magvlt.py:tiny --workdir=/tmp/pod")
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m magvlt_jax.tools.local_cluster")
  parser.add_argument("--processes", type=int, default=2, help="number of local processes")
  parser.add_argument("--devices_per_process", type=int, default=2,
                      help="fake CPU devices per process (jax_num_cpu_devices)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv[:split])
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error(f"--processes ({args.processes}) and --devices_per_process "
                 f"({args.devices_per_process}) must be >= 1")
  return args, argv[split + 1:]


def _worker(args, main_args):
  """One process: join the cluster, then run magvlt_jax.main with `main_args`."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices_per_process)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                             process_id=args.worker)
  from absl import app  # pylint: disable=import-outside-toplevel
  from magvlt_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  sys.argv = ["magvlt_jax.main", *main_args, "--config.mesh.distributed=True"]
  app.run(main_lib.main)


def _pump(proc, prefix):
  for line in proc.stdout:
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def launch(args, main_args) -> int:
  """Starts the processes, streams their output, returns the first non-zero status (or 0)."""
  coordinator = f"127.0.0.1:{args.port or _free_port()}"
  procs, pumps = [], []
  for pid in range(args.processes):
    cmd = [sys.executable, "-m", "magvlt_jax.tools.local_cluster", f"--worker={pid}",
           f"--coordinator={coordinator}", f"--processes={args.processes}",
           f"--devices_per_process={args.devices_per_process}", "--", *main_args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    procs.append(proc)
    pumps.append(threading.Thread(target=_pump, args=(proc, f"[p{pid}]"), daemon=True))
    pumps[-1].start()
  status = 0
  try:
    pending = list(procs)
    while pending:
      for proc in list(pending):
        try:
          rc = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
          continue
        pending.remove(proc)
        if rc and not status:
          status = rc
          print(f"local_cluster: process {procs.index(proc)} exited with {rc}; stopping the others",
                file=sys.stderr)
          for other in pending:
            other.terminate()
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for t in pumps:
      t.join(timeout=5)
  return status


def main(argv=None):
  args, main_args = _parse(sys.argv[1:] if argv is None else argv)
  if args.worker is not None:
    _worker(args, main_args)
    return 0
  return launch(args, main_args)


if __name__ == "__main__":
  sys.exit(main())
