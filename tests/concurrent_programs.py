"""The Triton interpreter with a grid's programs running at the same time, in threads.

The interpreter runs a grid's programs one after another, so a program that waits for another (the
segmented policy kernel's spin on a row's counter) would wait forever. Inside ``concurrent_programs``
each program of an interpreted launch runs in its own thread, with its own program id, as on a GPU
whose programs are all resident: the waits between programs and the index arithmetic of a grid of
several programs run on CPU. Memory is sequentially consistent here (one interpreter, the GIL), so
what this cannot show is a missing fence; ``tests/test_gpu_segmented.py`` checks that on a GPU.

A launch whose programs have not all finished after ``timeout_s`` (a wait never met) raises
``TimeoutError``, and its threads stop at their next atomic operation.
"""

import contextlib
import inspect
import threading

import triton.language as tl  # noqa: F401  (the interpreter patches the language modules that the
from triton.runtime import interpreter  # launched function's globals hold: these, for the wrapper)


@contextlib.contextmanager
def concurrent_programs(monkeypatch, timeout_s=120.0):
    local = threading.local()
    abort = threading.Event()
    builder = interpreter.InterpreterBuilder

    # Each thread's program id: the builder reads ``grid_idx`` for tl.program_id.
    monkeypatch.setattr(builder, "grid_idx", property(lambda self: getattr(local, "grid_idx", None),
                                                      lambda self, value: setattr(local, "grid_idx", value)),
                        raising=False)
    real_atomic = builder.create_atomic_rmw

    def atomic_rmw(self, *args, **kwargs):
        if abort.is_set():
            raise TimeoutError("stopped: the launch timed out")
        return real_atomic(self, *args, **kwargs)

    monkeypatch.setattr(builder, "create_atomic_rmw", atomic_rmw)
    real_init = interpreter.GridExecutor.__init__

    def init(self, fn, *args, **kwargs):
        real_init(self, fn, *args, **kwargs)
        threads, errors = [], []

        def start(**call_args):
            idx = interpreter.interpreter_builder.grid_idx

            def body():
                local.grid_idx = idx
                try:
                    fn(**call_args)
                except BaseException as e:  # noqa: BLE001  (re-raised by the last program's launch)
                    errors.append(e)

            thread = threading.Thread(target=body, daemon=True)
            thread.start()
            threads.append(thread)
            last = tuple(d - 1 for d in interpreter.interpreter_builder.grid_dim)
            if idx != last:
                return
            for t in threads:
                t.join(timeout_s)
            if any(t.is_alive() for t in threads):
                abort.set()
                for t in threads:
                    t.join(10.0)
                abort.clear()
                raise TimeoutError(f"{sum(t.is_alive() for t in threads)} of {len(threads)} programs still "
                                   f"running after {timeout_s} s: a wait that is never met")
            if errors:
                raise errors[0]

        # The interpreter reads the kernel's parameters from the launched function's signature.
        start.__signature__ = inspect.signature(fn)
        self.fn = start

    monkeypatch.setattr(interpreter.GridExecutor, "__init__", init)
    yield
