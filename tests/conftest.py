"""Shared test setup: quiet TensorFlow, the project root on sys.path, and one
JAX compilation cache for the whole test session.

Much of the suite's time is XLA compiling the same programs again: every
run.train call, train.py subprocess and notebook kernel builds fresh jitted
functions for the same tiny models.  JAX's persistent compilation cache
(programs that took over a second to compile, keyed by their full HLO,
compile options, backend and JAX version) lets a later compile of an
identical program load the executable instead; the executable is the same,
so no result changes.  The cache lives in a temporary directory made by the
main pytest process and removed at its end; pytest-xdist workers,
subprocesses and notebook kernels inherit it through the environment.  A
JAX_COMPILATION_CACHE_DIR that is already set is used as it is and kept.

With pytest-xdist (setup.cfg's addopts: -n auto --dist loadfile
--no-loadscope-reorder) whole files are handed to the workers in collection
order; the longest files are moved to the front of it, so that none of them
is left running alone at the end (the notebooks take about 6 minutes).
"""
import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_made_cache_dir = None


def pytest_configure(config):
  global _made_cache_dir
  if hasattr(config, 'workerinput') or os.environ.get(_CACHE_ENV):
    return  # an xdist worker (inherits the main process's) or the user's own
  _made_cache_dir = tempfile.mkdtemp(prefix='pytest-jax-cache-')
  os.environ[_CACHE_ENV] = _made_cache_dir


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  global _made_cache_dir
  if _made_cache_dir:
    os.environ.pop(_CACHE_ENV, None)
    shutil.rmtree(_made_cache_dir, ignore_errors=True)
    _made_cache_dir = None


# The slowest test files, slowest first (measured on the 2-core CI machine;
# an unlisted file runs after these, so this list needs no upkeep to be
# correct, only to stay fast).
_SLOW_FIRST = ('test_notebooks.py', 'test_terraformer_lm.py', 'test_feedback.py',
               'test_model.py', 'test_trainer.py', 'test_run.py',
               'test_reversible.py', 'test_lsh.py', 'test_switch.py',
               'test_seq2seq.py', 'test_terraformer.py', 'test_parallel.py',
               'test_primer_variants.py', 'test_sharing.py',
               'test_sparse_qkv.py', 'test_primer.py')


def pytest_collection_modifyitems(items):
  """Slow files first; the order within a file and of the others is kept."""
  def rank(item):
    name = item.path.name
    return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)
  items.sort(key=rank)  # a stable sort
