"""Compiled programs by batch shapes, and compiling them ahead on a background thread.

    programs = Programs(on_mesh)                     # on_mesh(): the mesh and axis rules
    out = programs.run(jitted, "step", *args)        # the last arg a typed batch
    programs.ahead(jitted, "step", *abstract_args)   # ShapeDtypeStructs with shardings

A jitted function is compiled once per (kind, batch type, batch shapes): example batches
cut to their length bucket bring a few shapes, packed text windows one. `compile_seconds`
sums the time dispatches waited on XLA, which the loop leaves out of its step times.
"""

import concurrent.futures
import time

import jax


def program_key(kind, batch):
  """Which compiled program serves `batch` (global arrays or ShapeDtypeStructs)."""
  return (kind, type(batch).__name__) + batch.shapes()


class Programs:

  def __init__(self, on_mesh):
    self.on_mesh = on_mesh
    self.compile_seconds = None  # all compilations waited for so far
    self._compiled = {}  # program_key -> jax.stages.Compiled, or a Future of one

  def run(self, jitted, kind, *args):
    """jitted(*args), through the program compiled for the shapes of args[-1]."""
    key = program_key(kind, args[-1])
    with self.on_mesh():
      compiled = self._compiled.get(key)
      if not isinstance(compiled, jax.stages.Compiled):
        # Queued steps run on while XLA compiles: wait for them, so that the compile time
        # the loop takes out of its step times overlaps no training.
        jax.block_until_ready(args[0])
        start = time.perf_counter()
        if compiled is None:
          compiled = jitted.lower(*args).compile()
        else:  # compiling ahead: wait for the rest
          compiled = compiled.result()
        self._compiled[key] = compiled
        self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - start
      return compiled(*args)

  def ahead(self, jitted, kind, *abstract_args):
    """Starts compiling jitted for these abstract arguments on a background thread, so
    that XLA compiles while the caller does other work; the first `run` of those shapes
    then waits only for what is left. An error in the compilation is raised by that run."""
    key = program_key(kind, abstract_args[-1])
    if key in self._compiled:
      return

    def build():
      with self.on_mesh():  # the mesh and the axis rules are per thread
        return jitted.lower(*abstract_args).compile()

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lm-compile")
    self._compiled[key] = pool.submit(build)
    pool.shutdown(wait=False)  # the thread ends with the compilation
