"""Cheaper checks replayed on every recorded run that has the agreement curve (all but the MNIST
MLP's tuning runs): python3 docs/results/stopping/tuning/cheap_check.py. Exact replays: a check
of fewer evenly spaced fractions gives the area of the recorded mean curve at those fractions
(the trapezoid area is linear in the curve), one of fractions [0, 1] the mean of the curve's ends
(every unit clamped is the same in every order). "1 order" takes the first recorded order's area:
the order a check of one order draws may be another one."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rules import *
runs=[r for r in load(['tune-*.jsonl','heldout-*.jsonl'])
      if r['kind']!='full' or all('agreement' in e['check'] for e in r['epochs'] if e.get('check'))]
full,val=groups(runs)
order=['mnist-mlp','mnist-cnn-plain','fashion-mlp','fashion-cnn','mnist-transformer','mnist-resnet']
rules=[('default: 17 fractions x 3 orders (49 clamp settings)', 'agr'),
       ('9 fractions x 3 orders (25)', 'frac9'),
       ('5 fractions x 3 orders (13)', 'frac5'),
       ('17 fractions x 1 order (17)', 'order1'),
       ('fractions [0, 1] (2)', 'ends'),
       ('no reliance plateau (1: the unablated pass only)', 'off')]
for name,seeds in [('tuning seeds 0-2',[0,1,2]),('held-out seeds 3-7',[3,4,5,6,7])]:
    print(f'\n{name}: mean gap to the accuracy oracle over the noisy cells (points)')
    print('| check | '+' | '.join(order)+' |')
    print('|---|'+'---|'*len(order))
    for label,m in rules:
        res=evaluate(lambda R_: replay_centre(R_,drop=1.0,metric=m),full,val,seeds=seeds)
        print(f'| {label} | '+' | '.join(f'{res[s][0]:.2f}' if s in res else '–' for s in order)+' |')
for label,m in rules[1:]:
    diff=tot=0
    for (c,seed),R_ in full.items():
        if c[2]<0.2: continue
        tot+=1; diff+= replay_centre(R_,drop=1.0)[1]!=replay_centre(R_,drop=1.0,metric=m)[1]
    print(f'{label}: kept epoch differs from the default in {diff} of {tot} noisy runs')
