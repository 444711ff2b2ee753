"""Replay of the recorded stopping runs (../runs/*.jsonl) in Python: helpers shared by rules.py."""
import json, glob, math, statistics as st
from collections import defaultdict
import os
RUNS=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'runs', '')
def load(patterns):
    out=[]
    for p in patterns:
        for f in sorted(glob.glob(RUNS+p)):
            for l in open(f):
                if l.strip():
                    r=json.loads(l)
                    if r.get('quick'): continue
                    out.append(r)
    return out
def setname(r): return f"{r['data']}-{r['model']}"
def cell(r): return (setname(r), r['optim'], r['noise'])
def mean3(c,k):
    v=c.get(k)
    if v is None: return None
    return sum(v[:3])/3
def agr(c):
    v=mean3(c,'agreement_auc')
    return v if v is not None else mean3(c,'self_auc')
class R:
    """a full run as arrays indexed by epoch (1-based)"""
    def __init__(s, r):
        s.r=r; s.E=len(r['epochs']); ep=r['epochs']
        s.test=[None]+[e['test_acc'] for e in ep]
        s.tloss=[None]+[e['test_loss'] for e in ep]
        s.chg=[None]+[e.get('changes') for e in ep]
        s.tracc=[None]+[e.get('train_acc') for e in ep]
        s.trloss=[None]+[e.get('train_loss') for e in ep]
        s.fitc=[None]+[e.get('fit_corrupted') for e in ep]
        s.chk=[None]+[e.get('check') for e in ep]
        s.agr=[None]+[agr(c) if c else None for c in s.chk[1:]]
        s.auc=[None]+[mean3(c,'auc') if c else None for c in s.chk[1:]]
        s.acc0=[None]+[c['acc0'] if c else None for c in s.chk[1:]]
        s.schg=[None]+[c.get('subset_changes') if c else None for c in s.chk[1:]]
        s.finite=[None]+[c.get('finite',True) if c else True for c in s.chk[1:]]
    def oracle(s): return max(s.test[1:])
def groups(runs):
    full=defaultdict(list); val=defaultdict(list)
    for r in runs:
        k=(cell(r), r['seed'])
        if r['kind']=='full': full[k]=R(r)
        elif r['kind']=='val20':
            # kept: lowest val loss
            ep=r['epochs']; i=min(range(len(ep)), key=lambda i:(ep[i]['val_loss'], i))
            val[k]=ep[i]['test_acc']
    return full,val

# --- Label Wave (as the crate) ---
class LabelWave:
    def __init__(s, window=3, patience=5):
        s.w=window; s.p=patience; s.c=[]; s.lowest=None; s.stopped=False
    def update(s, epoch, changes):
        if s.stopped: return True
        s.c.append((epoch,changes)); w=s.w; h=w//2
        if len(s.c)>=w:
            tail=s.c[-w:]; m=sum(v for _,v in tail)/w; centre=tail[h][0]
            if s.lowest is None or m < s.lowest[1]: s.lowest=(centre,m)
        if s.lowest and epoch >= s.lowest[0]+h+s.p:
            s.stopped=True
        return s.stopped
def label_wave(R_, window=3, patience=5, key='chg'):
    lw=LabelWave(window,patience)
    for e in range(2,R_.E+1):
        v = R_.chg[e] if key=='chg' else (R_.schg[e] if R_.chk[e] and R_.chk[e-1] else None)
        if v is None: continue
        if lw.update(e,v): return e, lw.lowest[0]
    return R_.E, (lw.lowest[0] if lw.lowest else R_.E)

def evaluate(rule, full, val, sets=None, seeds=None, noise_min=0.2, verbose=False, lw_params=(3,5)):
    """rule(R)->(stop,kept). Returns per set mean gap and per cell comparisons."""
    per=defaultdict(lambda: defaultdict(list))
    for (c,seed),R_ in full.items():
        if sets and c[0] not in sets: continue
        if seeds is not None and seed not in seeds: continue
        if c[2] < noise_min: continue
        stop,kept=rule(R_)
        lws,lwk=label_wave(R_,*lw_params)
        per[c[0]][(c[1],c[2])].append(dict(seed=seed, acc=R_.test[kept], oracle=R_.oracle(), stop=stop, kept=kept,
            lw=R_.test[lwk], val=val.get((c,seed))))
    res={}
    for s,cells in sorted(per.items()):
        gaps=[]; lines=[]; wins_val=0; wins_lw=0; n=0
        for k,v in sorted(cells.items()):
            a=st.mean(x['acc'] for x in v); o=st.mean(x['oracle'] for x in v); lw=st.mean(x['lw'] for x in v)
            vv=[x['val'] for x in v if x['val'] is not None]
            vm=st.mean(vv) if len(vv)==len(v) else None
            gaps.append(o-a); n+=1
            if vm is not None and a>=vm-1e-12: wins_val+=1
            if a>=lw-1e-12: wins_lw+=1
            lines.append(f"  {k[0]:8s} {k[1]:.1f}: acc {a*100:6.2f} gap {(o-a)*100:5.2f}  val {'' if vm is None else f'{vm*100:6.2f}'}  lw {lw*100:6.2f}  stops {[x['stop'] for x in v]} kept {[x['kept'] for x in v]}")
        res[s]=(st.mean(gaps)*100, wins_val, wins_lw, n)
        if verbose:
            print(f"{s}: mean gap {st.mean(gaps)*100:.2f}  >=val {wins_val}/{n}  >=LW {wins_lw}/{n}")
            for l in lines: print(l)
    return res
