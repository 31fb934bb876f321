r"""Builds an English text corpus from the documentation installed on this machine.

For GPU runs that need more English text than the built-in `python_docs`
(about 0.5 MB) and no network: concatenates the reStructuredText and Markdown
files found under the given roots (package READMEs and manuals), skipping
licences and change logs, removing exact duplicates, in a fixed (sorted)
order so the same machine gives the same file.  Markup is kept as it is.

    python bench/make_docs_corpus.py --out=runs/corpus/docs_en.txt

Pass the result to train.py or the ablation lab as --dataset=runs/corpus/docs_en.txt.
"""

import hashlib
import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/corpus/docs_en.txt', 'output text file.')
flags.DEFINE_list('roots', [sys.prefix, '/usr/share/doc', '/usr/lib/python3'],
                  'folders searched.')
flags.DEFINE_integer('min_bytes', 2048, 'skip smaller files.')
flags.DEFINE_integer('max_mb', 60, 'stop after this many MB.')

SKIP = ('license', 'licence', 'copying', 'changelog', 'changes', 'history', 'news',
        'authors', 'notice')


def find_files(roots):
  for root in roots:
    for folder, _, names in os.walk(root):
      for name in names:
        lower = name.lower()
        if lower.endswith(('.rst', '.md')) and not lower.startswith(SKIP):
          yield os.path.join(folder, name)


def main(argv):
  del argv
  seen, total, parts = set(), 0, []
  for path in sorted(set(find_files(FLAGS.roots))):
    try:
      if os.path.getsize(path) < FLAGS.min_bytes:
        continue
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    digest = hashlib.sha256(text.encode('utf-8')).hexdigest()
    if digest in seen:
      continue
    seen.add(digest)
    parts.append(text.strip() + '\n\n')
    total += len(parts[-1].encode('utf-8'))
    if total > FLAGS.max_mb * 1e6:
      break
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    f.writelines(parts)
  print(f'{FLAGS.out}: {len(parts)} files, {total / 1e6:.1f} MB')


if __name__ == '__main__':
  app.run(main)
