"""The notebooks in notebooks/ run top to bottom and are stored without outputs.

Each notebook is executed with nbclient in a kernel named 'python3' that runs
this interpreter (a kernel spec written to a temporary JUPYTER_PATH, which
Jupyter searches first), with the repository on PYTHONPATH.  A cell that
raises fails the test with that cell's traceback; the notebooks check their
own results with `assert`s.  This is the slow file of the suite, mostly
single-threaded Python (importing trax) and XLA compilation, so the
notebooks run at the same time, one kernel each (nbclient's async API), the
first time a test asks for them.
"""

import asyncio
import glob
import json
import os
import sys

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
EXPECTED = ('terraformer_from_scratch.ipynb', 'primer.ipynb',
            'feedback_transformer.ipynb')
CELL_TIMEOUT_S = 900


def _name(path):
  return os.path.basename(path)


def test_the_three_notebooks_are_there():
  assert set(EXPECTED) <= {_name(p) for p in NOTEBOOKS}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, f'{_name(path)} has no code cells'
  for i, cell in enumerate(code):
    assert not cell.outputs and cell.execution_count is None, (
        f'{_name(path)}: code cell {i} is stored with outputs; clear them '
        '(e.g. jupyter nbconvert --clear-output --inplace).')


@pytest.fixture(scope='module')
def python3_kernel(tmp_path_factory):
  """A 'python3' kernel spec for this interpreter, found before any other."""
  jupyter_path = tmp_path_factory.mktemp('jupyter')
  spec_dir = jupyter_path / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  spec = {'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
                   '{connection_file}'],
          'display_name': 'Python 3 (tests)', 'language': 'python'}
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JUPYTER_PATH', str(jupyter_path))
    mp.setenv('PYTHONPATH', os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    yield


@pytest.fixture(scope='module')
def executed(python3_kernel):  # pylint: disable=unused-argument
  """Path -> the executed notebook, or the exception its execution raised."""
  async def run_all():
    clients = [NotebookClient(nbformat.read(path, as_version=4),
                              timeout=CELL_TIMEOUT_S, kernel_name='python3',
                              resources={'metadata': {'path': NOTEBOOK_DIR}})
               for path in NOTEBOOKS]
    return await asyncio.gather(*(c.async_execute() for c in clients),
                                return_exceptions=True)
  return dict(zip(NOTEBOOKS, asyncio.run(run_all())))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_runs_top_to_bottom(path, executed):
  nb = executed[path]
  if isinstance(nb, BaseException):
    raise nb  # e.g. CellExecutionError, naming the failing cell
  errors = [o for c in nb.cells if c.cell_type == 'code'
            for o in c.outputs if o.output_type == 'error']
  assert not errors
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert images, f'{_name(path)} drew no figure'
