"""The accuracy_unstable threshold: per noisy cell, each run's largest relative fall of the probe
data's accuracy between consecutive checks up to the default rule's stop, and the runs it would
warn at 8%. Chosen on the tuning seeds; the held-out seeds are printed for the record.

    python3 docs/results/stopping/tuning/swing.py
"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rules import *
from collections import defaultdict
THRESHOLD = 0.08
def largest_fall(R_, stop):
    acc = [R_.acc0[e] for e in range(2, stop + 1) if R_.chk[e] is not None and R_.acc0[e] is not None]
    return max([(acc[i - 1] - acc[i]) / acc[i - 1] for i in range(1, len(acc))] + [0.0])
for label, pattern, seeds in [('tuning seeds 0-2', 'tune-*.jsonl', {0, 1, 2}),
                              ('held-out seeds 3-5', 'heldout-*.jsonl', {3, 4, 5})]:
    full, val = groups(load([pattern]))
    cells = defaultdict(list)
    for (c, seed), R_ in sorted(full.items()):
        if c[2] < 0.2 or seed not in seeds: continue
        stop, kept = replay_centre(R_, drop=1.0)
        v = val.get((c, seed))
        cells[c].append((largest_fall(R_, stop), None if v is None else 100 * (v - R_.test[kept])))
    print(f'\n{label}\n\n| cell | largest falls | warned at {THRESHOLD:.0%} | validation (20%) minus default, points |')
    print('|---|---|---|---|')
    for c, v in sorted(cells.items()):
        d = [x[1] for x in v if x[1] is not None]
        print(f'| {c[0]}, {c[1]}, noise {c[2]} | ' + ', '.join(f'{x[0]:.3f}' for x in v)
              + f' | {sum(x[0] > THRESHOLD for x in v)}/{len(v)} | '
              + (f'{sum(d) / len(d):+.2f}' if d else '–') + ' |')
