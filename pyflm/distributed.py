"""Integration blocks and whole sweeps on a Dask cluster, when a scheduler is named.

``SCHEDULER tcp://host:port`` (or ``PYFLM_SCHEDULER``) sends PROCESS's block tasks to a running
``dask.distributed`` scheduler instead of local worker processes; ``pyflm batch`` sends whole decks
there.  Dask is an optional extra (``pip install pyflm[dask]``): nothing here imports it until a
scheduler is named.  Workers must see the images at the same paths (a shared file system) and have
pyflm installed.

Plain API: ``scheduler_from(kw) -> address or None``; ``executor(address)`` -> a
concurrent.futures.Executor whose tasks run on the cluster.  Results come back as the tasks' return
values, so the records are the same as on one core: blocks are independent and gathered in order.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import os

from .errors import ProcessingError
from ._heap import no_huge_pages

_CLIENTS = {}


def scheduler_from(kw):
    """The SCHEDULER keyword, else PYFLM_SCHEDULER, else None (run locally)."""
    v = (kw.get("SCHEDULER") or {}).get("_args", [None])[0]
    v = v or os.environ.get("PYFLM_SCHEDULER") or None
    return v.strip() if v else None


def client(address):
    """A connected dask.distributed Client for the address (one per address, kept for later actions)."""
    c = _CLIENTS.get(address)
    if c is not None and c.status == "running":
        return c
    try:
        from distributed import Client
    except ImportError:
        raise ProcessingError(f"SCHEDULER {address} needs dask.distributed, which is not installed "
                              "(pip install 'pyflm[dask]'), or leave SCHEDULER/PYFLM_SCHEDULER unset")
    try:
        c = Client(address, timeout="10s", set_as_default=False)
    except Exception as e:        # an unreachable or wrong address: one line, not a trace
        raise ProcessingError(f"cannot reach the Dask scheduler at {address} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no answer'}); expected a running "
                              "scheduler's address, tcp://host:port") from None
    try:        # the workers' malloc tuned as the program's (those there now; best effort)
        from ._heap import tune
        c.run(tune)
    except Exception:
        pass
    _CLIENTS[address] = c
    return c


class DaskExecutor(cf.Executor):
    """concurrent.futures.Executor on a Dask cluster, as ProcessPoolExecutor is used by integrate.

    Tasks are not 'pure': every submission runs, even with arguments equal to an earlier one's."""

    def __init__(self, address):
        self.address = address
        self._ex = client(address).get_executor(pure=False)

    def submit(self, fn, *args, **kwargs):
        return self._ex.submit(fn, *args, **kwargs)

    def shutdown(self, wait=True, *, cancel_futures=False):
        # the client stays connected for the next action; only this executor's tasks end here
        self._ex.shutdown(wait=wait and not cancel_futures)


def executor(address):
    return DaskExecutor(address)


def run_tasks(fn, tasks, nproc=1, scheduler=None, meanwhile=None):
    """[fn(*t) for t in tasks], in order: on the Dask cluster when a scheduler is named, else on up to
    nproc local worker processes (one task, or nproc 1: here).  fn must be a module-level function and
    its arguments small (paths, not images): each worker reads its own data.  With `meanwhile` (a
    callable), it runs here while the tasks run, and (results, its result) is returned.  fn should
    return failures as values: pyflm's errors do not survive the trip back from a worker process."""
    tasks = list(tasks)
    if len(tasks) < 2 or (nproc < 2 and not scheduler):
        out = [fn(*t) for t in tasks]
        return (out, meanwhile()) if meanwhile else out
    if scheduler:
        ex = executor(scheduler)
    else:
        ex = local_pool(nproc)
    futures = {}
    try:
        if scheduler:
            futures = {i: ex.submit(fn, *t) for i, t in enumerate(tasks)}
            here = meanwhile() if meanwhile else None
            out = [futures[i].result() for i in range(len(tasks))]
            return (out, here) if meanwhile else out
        # this process is one of the nproc: it does the first task (one result less to send back), then
        # takes the last not yet handed out, while a worker is given the next from the front only when
        # the pool has a worker without a task (an early probe may hold one): the tasks are not queued
        # behind other work while this process could do them.  Each task's result is the same wherever
        # it runs; they come back in order.
        pending = collections.deque(range(1, len(tasks)))

        def hand_out():
            while pending and ex.outstanding < nproc:
                i = pending.popleft()
                futures[i] = ex.submit(fn, *tasks[i])
        hand_out()
        here = meanwhile() if meanwhile else None
        done = {0: fn(*tasks[0])}
        while pending:
            hand_out()
            if pending:
                i = pending.pop()
                done[i] = fn(*tasks[i])
        out = [done[i] if i in done else ex.wait(futures[i]) for i in range(len(tasks))]
        return (out, here) if meanwhile else out
    except cf.process.BrokenProcessPool:
        drop_pool(ex)
        raise
    finally:
        for f in futures.values():
            f.cancel()
        if scheduler:
            ex.shutdown(wait=True, cancel_futures=True)


_POOLS = {}


def local_pool(n):
    """The job's worker processes for NPROC n: n - 1 of them, this process being the n-th (it runs tasks
    not yet handed to a worker while it waits for a result: _Pool.wait).  One pool for every stage
    (spot searches, indexing's fits, PROCESS's blocks), kept from one action to the next: forking a
    pool per PROCESS cost each new worker its start and its first block's page faults (a third slower
    than the blocks after it on the 6M sweep).  A broken pool (a worker died) is replaced.  They end
    with the program."""
    ex = _POOLS.get(n)
    if ex is None or getattr(ex, "_broken", False):
        no_huge_pages()          # (tune() at the program's start did it already; a caller's own start may not)
        _import_for_workers()
        ex = _POOLS[n] = _Pool(max_workers=max(1, n - 1), initializer=_worker_start)
    return ex


class _Pool(cf.ProcessPoolExecutor):
    """The job's worker pool.  A task is handed to a worker only when one is free (each worker holds
    one at a time); until then it is held here, and this process runs held tasks itself, oldest first,
    while it waits for a result (wait): for NPROC n it is one of the n.  (With n workers besides it,
    this process sat idle while they worked, and each worker faulted in a heap of its own: on the 6M
    sweep a block's 160 MB, 40 000 page faults of 1-8 us each on this machine.)  A held task can be
    cancelled, as a queued one in ProcessPoolExecutor.  `outstanding` counts the tasks not yet
    finished, wherever they are."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.n_workers = self._max_workers
        self.outstanding, self._count_lock = 0, threading.Lock()
        self._held, self._in_workers = collections.deque(), 0
        _widen_pipe(self._result_queue)

    def submit(self, fn, /, *args, **kwargs):
        f = cf.Future()
        with self._count_lock:
            self.outstanding += 1
            self._held.append((f, fn, args, kwargs))
        f.add_done_callback(self._finished)
        self._feed()
        return f

    def _finished(self, _):
        with self._count_lock:
            self.outstanding -= 1

    def _next_held(self, for_worker, any_worker=False):
        """The oldest held task not cancelled, marked running (None: none; or, for a worker, none free
        unless any_worker: the pool's own queue takes it)."""
        with self._count_lock:
            while self._held and not (for_worker and not any_worker and self._in_workers >= self.n_workers):
                item = self._held.popleft()
                if item[0].set_running_or_notify_cancel():
                    if for_worker:
                        self._in_workers += 1
                    return item
        return None

    def _feed(self, forward_all=False):
        """Held tasks to the workers free for them (every held one: forward_all)."""
        while True:
            item = self._next_held(for_worker=True, any_worker=forward_all)
            if item is None:
                return
            f, fn, args, kwargs = item
            try:
                w = super().submit(fn, *args, **kwargs)
            except BaseException as e:        # a broken or stopped pool
                with self._count_lock:
                    self._in_workers -= 1
                f.set_exception(e)
                continue
            w.add_done_callback(lambda w, f=f: self._returned(f, w))

    def _returned(self, f, w):
        with self._count_lock:
            self._in_workers -= 1
        if w.cancelled():
            f.set_exception(cf.CancelledError())
        elif w.exception() is not None:
            f.set_exception(w.exception())
        else:
            f.set_result(w.result())
        self._feed()

    def wait(self, f):
        """f's result; until it is done, this process runs the held tasks itself, oldest first."""
        while not f.done():
            item = self._next_held(for_worker=False)
            if item is None:
                break
            g, fn, args, kwargs = item
            try:
                r = fn(*args, **kwargs)
            except Exception as e:
                g.set_exception(e)
            except BaseException as e:        # a signal (Interrupted) or an exit: this process stops
                g.set_exception(e)
                raise
            else:
                g.set_result(r)
        return f.result()

    def shutdown(self, wait=True, *, cancel_futures=False):
        if cancel_futures:
            with self._count_lock:
                held, self._held = list(self._held), collections.deque()
            for f, *_ in held:
                f.cancel()
        else:
            self._feed(forward_all=True)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


def wait_for(ex, f):
    """f's result, from an executor of local_pool's (this process helping meanwhile) or any other."""
    return ex.wait(f) if isinstance(ex, _Pool) else f.result()


def _widen_pipe(queue):
    """The results' pipe widened to 4 MB (where the kernel lets this process: root), else to
    pipe-max-size (1 MB by default): a block's records (a megabyte on the 6M sweep) are then written
    in one go and the worker goes on to its next block, instead of waiting for this process, busy
    writing the MTZ, to read each 64 kB (its core idle meanwhile: 0.08 s a 6M run at NPROC 2, now 0.04,
    that being pickling)."""
    import fcntl
    for size in (4 << 20, None):
        try:
            if size is None:
                size = int(open("/proc/sys/fs/pipe-max-size").read())
            fcntl.fcntl(queue._writer.fileno(), fcntl.F_SETPIPE_SZ, size)
            return
        except (OSError, ValueError, AttributeError):
            pass


def _worker_start():
    """A local worker's start: signals left to the main process, malloc tuned as in the program (fork
    inherits it; a spawned or forkserver worker would not)."""
    from ._heap import tune
    from .integrate import _ignore_signals
    _ignore_signals()
    tune()


# what the workers' tasks import (indexing's fits, the blocks' kernels): imported here before they are
# forked, they have it; else each imports it again on its first such task (a quarter of a second of CPU
# each, on the way of the pre-refinement's fits that this process waits for)
_WORKER_MODULES = ("scipy.optimize", "scipy.spatial", "pyflm.spotfinder", "pyflm.predict", "pyflm.shoebox",
                   "pyflm.refine")


def _import_for_workers():
    import importlib
    for m in _WORKER_MODULES:
        importlib.import_module(m)


def stop_pools(wait=True):
    """Stop every local pool (their workers reaped when wait): a caller that measures the workers'
    resource use once the job is done."""
    for ex in list(_POOLS.values()):
        drop_pool(ex, wait=wait)


def drop_pool(ex, wait=False):
    """Stop a pool of local_pool's (its queued tasks cancelled) and forget it: the next asks for a new one."""
    for n, p in list(_POOLS.items()):
        if p is ex:
            del _POOLS[n]
    ex.shutdown(wait=wait, cancel_futures=True)


def n_workers(address):
    """Worker processes the scheduler has now (for the log line)."""
    try:
        return len(client(address).scheduler_info().get("workers", {}))
    except ProcessingError:
        raise
    except Exception:
        return 0
