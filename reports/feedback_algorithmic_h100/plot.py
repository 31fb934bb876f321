"""Plots eval answer accuracy against step for the runs in s14/ and s15/.

  python reports/feedback_algorithmic_h100/plot.py  # writes accuracy.png here
"""
import json
import os

import matplotlib
matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [  # file, label, style
    ('s15/metrics_C.jsonl', 'Feedback, curriculum (C)', 'C0-'),
    ('s15/metrics_TC.jsonl', 'Transformer, curriculum (TC)', 'C1-'),
    ('s15/metrics_B.jsonl', 'Feedback, 256 only (B)', 'C0:'),
    ('s14/metrics_TB.jsonl', 'Transformer, 256 only (TB)', 'C1:'),
]
PHASE_1_END = {'C': 1800, 'TC': 2000}  # steps on 64-token programs


def evals(path):
  rows = [json.loads(l) for l in open(os.path.join(HERE, path))]
  rows = sorted((r['step'], r['accuracy']) for r in rows if r['split'] == 'eval')
  return [s for s, _ in rows], [100 * a for _, a in rows]


def main():
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for path, label, style in RUNS:
    ax.plot(*evals(path), style, marker='.', label=label)
  for name, step in PHASE_1_END.items():
    ax.axvline(step, color='C0' if name == 'C' else 'C1', alpha=0.3, lw=1)
  ax.axhline(95, color='gray', ls='--', lw=0.8)
  ax.set_xlabel('training step (131K tokens each)')
  ax.set_ylabel('eval answer accuracy (%)')
  ax.set_title('3-variable algorithmic task, one H100; curriculum runs: 64-token\n'
               'programs up to the vertical line, 256-token programs after it',
               fontsize=9)
  ax.set_ylim(0, 102)
  ax.legend(fontsize=8, loc='center right')
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, 'accuracy.png'), dpi=110)


if __name__ == '__main__':
  main()
