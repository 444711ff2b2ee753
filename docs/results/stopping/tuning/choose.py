"""The tuning table of docs/results.md: python3 docs/results/stopping/tuning/choose.py (seeds 0-2 only)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rules import *
runs=load(['tune-*.jsonl'])
full,val=groups(runs)
T=[0,1,2]
order=['mnist-mlp','mnist-cnn-plain','fashion-mlp','fashion-cnn']
rows=[]
def row(n,f):
    res=evaluate(f,full,val,seeds=T)
    g=[res[s][0] for s in order]
    rows.append((n,g))
    print(f'| {n} | '+' | '.join(f'{x:.2f}' for x in g)+f' | {sum(g)/4:.2f} | {max(g):.2f} |')
print('| candidate | MNIST MLP | MNIST CNN | Fashion MLP | Fashion CNN (BN) | mean | worst |')
print('|---|---|---|---|---|---|---|')
row('0.1 rule (previous default)', replay_default)
row('Label Wave (window 3, patience 5)', lambda R_: label_wave(R_,3,5))
row('Label Wave, most accurate check up to its low', lambda R_: lw_keep_acc(R_,3,5))
row('**default**: Label Wave (3, 5) stops; most accurate candidate, a low making its centre a candidate', lambda R_: replay_centre(R_,drop=1.0))
row('the same, a low making its window\'s last epoch a candidate (one snapshot, no held epoch)', lambda R_: replay_k(R_,k=0,drop=1.0))
row('default without the reliance plateau (Label Wave lows only)', lambda R_: replay_centre(R_,drop=1.0,metric='off'))
row('default, Label Wave window 1, patience 5', lambda R_: replay_centre(R_,drop=1.0,lw=(1,5)))
row('default, Label Wave window 5, patience 5', lambda R_: replay_centre(R_,drop=1.0,lw=(5,5)))
row('default, Label Wave window 3, patience 8', lambda R_: replay_centre(R_,drop=1.0,lw=(3,8)))
for tol in [0.01,0.05,0.08]:
    row(f'default, tolerance {tol}', lambda R_: replay_centre(R_,drop=1.0,tol=tol))
row('default, metric: accuracy AUC', lambda R_: replay_centre(R_,drop=1.0,metric='auc'))
row('default, metric: normalized AUC', lambda R_: replay_centre(R_,drop=1.0,metric='nauc'))
row('default with the 0.1 accuracy guard', lambda R_: replay_centre(R_,drop=0.1))
row('default, stop only once the metric has also left its plateau (or 8 epochs later)', lambda R_: replay_new(R_,stop='and',timeout=8,drop=1.0))
row('default, a low a candidate only 3 epochs after the plateau', lambda R_: replay_k(R_,k=3,drop=1.0))
row('default, most accurate at 1/16 ablated instead of unablated', lambda R_: replay_key(R_,key=lambda c: c['curve'][1],k=0,drop=1.0))
row('default without observe (the probe data\'s changes)', lambda R_: replay_centre(R_,drop=1.0,src='schg'))
