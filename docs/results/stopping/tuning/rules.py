"""Candidate stopping rules, replayed over the recorded runs (a second implementation of the crate's rule)."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import *
class Default:
    """replica of the crate's EarlyStopping with fallback + guard (checks every epoch from 2)"""
    def __init__(s, tol=0.03, patience=8, drop=0.1, fallback=True, lw=(1,3), keep='acc', metric='agr'):
        s.tol=tol; s.pat=patience; s.drop=drop; s.fb=fallback; s.keepk=keep; s.metric=metric
        s.peak=None; s.kept=None; s.lnp=None; s.rose=False; s.wave=LabelWave(*lw); s.wave_kept=None; s.best_acc=None
        s.wave_fed=False; s.stopped=None
    def falling_back(s): return s.fb and not s.rose and s.wave_fed
    def kept_epoch(s):
        if s.wave_kept is not None and s.falling_back(): return s.wave_kept
        return s.kept[0] if s.kept else None
    def changes(s, e, n):
        if not s.fb: return
        before=s.wave.lowest; s.wave.update(e,n); s.wave_fed=True
        s.wkb=s.wave_kept
        if s.wave.lowest!=before: s.wave_kept=e
    def not_kept(s,e):
        if getattr(s,'wkb',None) is not None or hasattr(s,'wkb'):
            if s.wave_kept==e: s.wave_kept=s.wkb
    def check(s, e, m, acc):
        unstable = s.best_acc is not None and acc < (1-s.drop)*s.best_acc
        s.best_acc = acc if s.best_acc is None else max(s.best_acc, acc)
        if unstable:
            s.not_kept(e)
            return s.below(e) if s.peak else False
        if hasattr(s,'wkb'): del s.wkb
        new_peak = s.peak is None or m > s.peak[1]
        first_rise = new_peak and s.peak is not None and not s.rose
        wfb = s.falling_back()
        if new_peak:
            s.rose |= s.peak is not None; s.peak=(e,m,acc)
        floor = s.peak[1]*(1-s.tol)
        if m >= floor:
            s.lnp=e
            if first_rise and wfb: rep=True
            elif s.kept is None: rep=True
            elif s.keepk=='last': rep=True
            elif s.keepk=='peak': rep=new_peak
            else: rep = s.kept[1] < floor or acc >= s.kept[2]
            if rep: s.kept=(e,m,acc)
            return False
        return s.below(e)
    def below(s,e):
        ln = s.lnp if s.lnp is not None else s.peak[0]
        b = e-ln
        if b>=s.pat and s.falling_back():
            return s.wave.stopped and s.wave.lowest is not None
        return b>=s.pat
def metric_of(R_,e,metric):
    c=R_.chk[e]
    if metric=='off': return -float(e)
    if metric=='agr': return R_.agr[e]
    if metric=='auc': return R_.auc[e]
    if metric=='nauc': return R_.auc[e]/c['acc0']
    # A check of two fractions, [0, 1]: the agreement curve's ends (1 unclamped; every unit
    # clamped, the same in every order), whose trapezoid area is their mean.
    if metric=='ends': return (c['agreement'][0]+c['agreement'][-1])/2
    # Fewer evenly spaced fractions (17 = 1 + 16k): the trapezoid area is linear in the curve, so
    # the mean over orders of each order's area is the area of the recorded mean curve.
    if metric.startswith('frac'):
        f=int(metric[4:]); v=c['agreement']; step=(len(v)-1)//(f-1)
        pts=v[::step]; h=1/(f-1)
        return sum((pts[i]+pts[i+1])/2*h for i in range(f-1))
    # One random order instead of three: the first order's area.
    if metric=='order1': return c['agreement_auc'][0]
def replay_default(R_, **kw):
    s=Default(**kw)
    for e in range(2,R_.E+1):
        c=R_.chk[e]
        if not c: continue
        if not R_.finite[e]: return e, s.kept_epoch() or e
        if e>=3 and R_.schg[e] is not None: s.changes(e, R_.schg[e])
        if s.check(e, metric_of(R_,e,s.metric), R_.acc0[e]):
            return e, s.kept_epoch() or e
    return R_.E, s.kept_epoch() or R_.E

def argmax_acc0(R_, lo, hi, guard=None):
    best=None
    for e in range(max(lo,2), hi+1):
        if R_.chk[e] is None: continue
        a=R_.acc0[e]
        if best is None or a>=best[1]: best=(e,a)
    return best[0] if best else hi
def lw_keep_acc(R_, window=3, patience=5, key='chg', slack=0):
    stop,low=label_wave(R_,window,patience,key)
    return stop, argmax_acc0(R_, 2, min(stop, low+slack))

def argbest(R_, lo, hi, key):
    best=None
    for e in range(max(lo,2), hi+1):
        if R_.chk[e] is None: continue
        v=key(R_,e)
        if v is None: continue
        if best is None or v>=best[1]: best=(e,v)
    return best[0] if best else hi
def lw_keep(R_, key, window=3, patience=5, src='chg', slack=0):
    stop,low=label_wave(R_,window,patience,src)
    return stop, argbest(R_, 2, min(stop, low+slack), key)
K_acc=lambda R_,e: R_.acc0[e]
K_nloss=lambda R_,e: -R_.chk[e]['diag']['subset_loss'] if 'diag' in R_.chk[e] else None
def K_accf(i):
    return lambda R_,e: R_.chk[e]['curve'][i] if 'curve' in R_.chk[e] else None
K_auc=lambda R_,e: R_.auc[e]

def reliance_track(R_, tol=0.03, patience=8, drop=0.1, metric='agr'):
    """per epoch: (rose, last_near_peak, would_stop) of the reliance plateau rule with the guard, no fallback"""
    s=Default(tol=tol, patience=patience, drop=drop, fallback=False, metric=metric)
    out={}; stop=None
    for e in range(2,R_.E+1):
        if not R_.chk[e]: continue
        st_=s.check(e, metric_of(R_,e,metric), R_.acc0[e])
        if st_ and stop is None: stop=e
        out[e]=(s.rose, s.lnp, stop, s.peak[0] if s.peak else None)
    return out, stop
def lw_track(R_, window=3, patience=5, src='chg'):
    lw=LabelWave(window,patience); out={}; stop=None
    for e in range(2,R_.E+1):
        v = R_.chg[e] if src=='chg' else (R_.schg[e] if R_.chk[e] and R_.chk[e-1] else None)
        if v is not None:
            if lw.update(e,v) and stop is None: stop=e
        out[e]=(lw.lowest[0] if lw.lowest else None, stop)
    return out, stop
def combined(R_, mode='and', timeout=10, lw=(3,5), rel=dict(), src='chg', keepkey=K_acc, end='max', rose_min=0.0):
    rt,_=reliance_track(R_, **rel); lt,_=lw_track(R_, *lw, src=src)
    first=None
    for e in range(2,R_.E+1):
        if e not in rt: continue
        rose,lnp,rstop,peak=rt[e]; low,lstop=lt[e]
        if first is None: first=R_.agr[e] if False else metric_of(R_,e,rel.get('metric','agr'))
        informative = rose
        fired=[]
        if informative and rstop is not None: fired.append(('R',rstop,lnp))
        if lstop is not None: fired.append(('L',lstop,low))
        stop=False
        if mode=='and':
            if informative:
                if len(fired)==2: stop=True
                elif len(fired)==1 and e-fired[0][1]>=timeout: stop=True
            else:
                stop = lstop is not None
        elif mode=='or':
            stop = len(fired)>0
        elif mode=='lw':
            stop = lstop is not None
        elif mode=='r':
            stop = informative and rstop is not None
        if stop or e==R_.E:
            ends=[]
            if informative: ends.append(lnp if lnp else e)
            if low is not None: ends.append(low)
            if not ends: we=e
            elif end=='max': we=max(ends)
            elif end=='min': we=min(ends)
            elif end=='r': we=(lnp if informative and lnp else (low or e))
            if not stop: we=e   # budget end: nothing fired -> whole run
            return e, argbest(R_,2,we,keepkey)
    return R_.E, argbest(R_,2,R_.E,keepkey)

class Online:
    """online, one snapshot slot: a check is a candidate when it is on the reliance plateau or
    is Label Wave's new low (the last epoch of the lowest window); kept = most accurate candidate.
    stop = Label Wave stop."""
    def __init__(s, tol=0.03, lw=(3,5), src='chg', use_plateau=True, metric='agr', plateau_rose_only=False):
        s.tol=tol; s.wave=LabelWave(*lw); s.src=src; s.use_plateau=use_plateau; s.metric=metric
        s.peak=None; s.kept=None; s.low_epoch=None; s.rose=False; s.first=None; s.pro=plateau_rose_only
    def epoch(s, R_, e):
        v = R_.chg[e] if s.src=='chg' else (R_.schg[e] if R_.chk[e] and e>=3 and R_.chk[e-1] else None)
        newlow=False
        if v is not None:
            before=s.wave.lowest; s.wave.update(e,v)
            if s.wave.lowest!=before: newlow=True
        if R_.chk[e] is None: return False
        m=metric_of(R_,e,s.metric); a=R_.acc0[e]
        if s.peak is None or m > s.peak:
            if s.peak is not None: s.rose=True
            s.peak=m
        onp = m >= s.peak*(1-s.tol) and s.use_plateau and (s.rose or not s.pro)
        # before Label Wave has any low, every check is a candidate (nothing is known yet)
        cand = onp or newlow or s.wave.lowest is None
        if cand and (s.kept is None or a >= s.kept[1]): s.kept=(e,a)
        return s.wave.stopped
def replay_online(R_, **kw):
    s=Online(**kw)
    for e in range(2,R_.E+1):
        if s.epoch(R_,e): return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

class TwoSlot:
    """exact 'most accurate check up to W = max(plateau end, LW low (window-last epoch))', with a
    pending slot; stop = LW stop. At the stop, kept is final."""
    def __init__(s, tol=0.03, lw=(3,5), src='chg', use_plateau=True, metric='agr', budget='window'):
        s.tol=tol; s.wave=LabelWave(*lw); s.src=src; s.use_plateau=use_plateau; s.metric=metric
        s.peak=None; s.kept=None; s.pending=None; s.W=None; s.budget=budget
    def better(s,a,b):
        if a is None: return b
        if b is None: return a
        return b if b[1]>=a[1] else a
    def epoch(s, R_, e):
        v = R_.chg[e] if s.src=='chg' else (R_.schg[e] if R_.chk[e] and e>=3 and R_.chk[e-1] else None)
        newlow=False
        if v is not None:
            before=s.wave.lowest; s.wave.update(e,v)
            if s.wave.lowest!=before: newlow=True
        if R_.chk[e] is None: return False
        m=metric_of(R_,e,s.metric); a=R_.acc0[e]
        if s.peak is None or m > s.peak: s.peak=m
        onp = s.use_plateau and m >= s.peak*(1-s.tol)
        cur=(e,a)
        if onp or newlow or s.wave.lowest is None:
            s.kept=s.better(s.better(s.kept,s.pending),cur); s.pending=None; s.W=e
        else:
            s.pending=s.better(s.pending,cur)
        return s.wave.stopped
    def final(s, budget_end):
        if budget_end and s.budget=='all':
            return s.better(s.kept,s.pending)
        return s.kept
def replay_two(R_, **kw):
    s=TwoSlot(**kw)
    for e in range(2,R_.E+1):
        if s.epoch(R_,e): return e, s.final(False)[0]
    k=s.final(True)
    return R_.E, k[0] if k else R_.E

class NewRule:
    """the candidate state machine: LW stop; candidates = plateau checks (stable) or LW new low or no low yet;
    kept = most accurate candidate (later among equals)."""
    def __init__(s, tol=0.03, lw=(3,5), drop=0.1, metric='agr', src='auto', stop='lw', timeout=8):
        s.tol=tol; s.wave=LabelWave(*lw); s.drop=drop; s.metric=metric; s.src=src
        s.peak=None; s.best_acc=None; s.kept=None; s.source=None; s.stop_mode=stop; s.timeout=timeout
        s.lnp=None; s.warn=[]; s.lw_stop_epoch=None
    def feed(s, e, v, src):
        if v is None: return False
        if s.source is None: s.source=src
        if s.source!=src: return False
        before=s.wave.lowest; s.wave.update(e,v)
        return s.wave.lowest!=before
    def step(s, R_, e):
        newlow=False
        if s.src in ('auto','chg'): newlow |= s.feed(e, R_.chg[e], 'chg')
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            if not R_.finite[e]: return 'nonfinite'
            if s.src in ('auto','schg') and e>=3 and R_.chk[e-1] is not None:
                newlow |= s.feed(e, R_.schg[e], 'schg')
            m=metric_of(R_,e,s.metric); a=R_.acc0[e]
            unstable = s.best_acc is not None and a < (1-s.drop)*s.best_acc
            s.best_acc = a if s.best_acc is None else max(s.best_acc,a)
            if not unstable:
                if s.peak is None or m > s.peak: s.peak=m
                onp = m >= s.peak*(1-s.tol)
                if onp: s.lnp=e
                cand = onp or newlow or s.wave.lowest is None
                if cand and (s.kept is None or a >= s.kept[1]): s.kept=(e,a)
        if s.wave.stopped:
            if s.lw_stop_epoch is None: s.lw_stop_epoch=e
            if s.stop_mode=='lw': return 'stop'
            if s.stop_mode=='and':
                off = s.lnp is not None and e - s.lnp >= 1
                if off or e - s.lw_stop_epoch >= s.timeout: return 'stop'
        return None
def replay_new(R_, **kw):
    s=NewRule(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

def warn_replay(R_, W=5, **kw):
    s=NewRule(**kw); w1=None; w2=None
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        c=R_.chk[e]
        if c is not None and w1 is None and s.lnp is not None and e - s.lnp >= W and s.wave.lowest and s.wave.lowest[0] > s.lnp and not s.wave.stopped:
            w1=e
        if r:
            if s.lnp == e and w2 is None: w2=e
            return e, (s.kept[0] if s.kept else e), w1, w2
    return R_.E, (s.kept[0] if s.kept else R_.E), w1, w2

class NewRuleK(NewRule):
    """LW lows are candidates only when at least k epochs after the plateau's last check"""
    def __init__(s, k=0, **kw):
        super().__init__(**kw); s.k=k
    def step(s, R_, e):
        newlow=False
        if s.src in ('auto','chg'): newlow |= s.feed(e, R_.chg[e], 'chg')
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            if not R_.finite[e]: return 'nonfinite'
            if s.src in ('auto','schg') and e>=3 and R_.chk[e-1] is not None:
                newlow |= s.feed(e, R_.schg[e], 'schg')
            m=metric_of(R_,e,s.metric); a=R_.acc0[e]
            if s.peak is None or m > s.peak: s.peak=m
            onp = m >= s.peak*(1-s.tol)
            if onp: s.lnp=e
            lowcand = newlow and (s.lnp is None or e >= s.lnp + s.k)
            cand = onp or lowcand or s.wave.lowest is None
            if cand and (s.kept is None or a >= s.kept[1]): s.kept=(e,a)
        if s.wave.stopped: return 'stop'
        return None
def replay_k(R_, **kw):
    s=NewRuleK(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

class NewRuleRaw(NewRule):
    """stop = LW(window, patience); candidates = plateau, or a new minimum of the raw changes
    (cand_window lows of a separate LW), or no low yet"""
    def __init__(s, cand_window=1, **kw):
        super().__init__(**kw); s.cw=LabelWave(cand_window, 10**9)
    def step(s, R_, e):
        newlow=False
        def feed2(v, src):
            nonlocal newlow
            if v is None: return
            if s.source is None: s.source=src
            if s.source!=src: return
            s.wave.update(e,v)
            b=s.cw.lowest; s.cw.update(e,v)
            if s.cw.lowest!=b: newlow=True
        if s.src in ('auto','chg'): feed2(R_.chg[e], 'chg')
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            if not R_.finite[e]: return 'nonfinite'
            if s.src in ('auto','schg') and e>=3 and R_.chk[e-1] is not None:
                feed2(R_.schg[e], 'schg')
            m=metric_of(R_,e,s.metric); a=R_.acc0[e]
            if s.peak is None or m > s.peak: s.peak=m
            onp = m >= s.peak*(1-s.tol)
            if onp: s.lnp=e
            cand = onp or newlow or s.cw.lowest is None
            if cand and (s.kept is None or a >= s.kept[1]): s.kept=(e,a)
        if s.wave.stopped: return 'stop'
        return None
def replay_raw(R_, **kw):
    s=NewRuleRaw(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

class NewRuleKey(NewRuleK):
    def __init__(s, key=None, **kw):
        super().__init__(**kw); s.key=key
    def step(s, R_, e):
        if s.key is None: return super().step(R_, e)
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            saved=R_.acc0[e]; R_.acc0[e]=s.key(c)
            r=super().step(R_,e); R_.acc0[e]=saved
            return r
        return super().step(R_,e)
def replay_key(R_, **kw):
    s=NewRuleKey(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

class NewRuleFall(NewRule):
    """an LW low makes a candidate only if the raw count did not rise at this epoch"""
    def __init__(s, slack=0.0, **kw):
        super().__init__(**kw); s.prev=None; s.slack=slack
    def step(s, R_, e):
        newlow=False; raw=None
        if s.src in ('auto','chg'):
            if R_.chg[e] is not None and s.source in (None,'chg'):
                raw=R_.chg[e]
            newlow |= s.feed(e, R_.chg[e], 'chg')
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            if not R_.finite[e]: return 'nonfinite'
            if s.src in ('auto','schg') and e>=3 and R_.chk[e-1] is not None:
                if R_.schg[e] is not None and s.source in (None,'schg'): raw=R_.schg[e]
                newlow |= s.feed(e, R_.schg[e], 'schg')
            m=metric_of(R_,e,s.metric); a=R_.acc0[e]
            if s.peak is None or m > s.peak: s.peak=m
            onp = m >= s.peak*(1-s.tol)
            if onp: s.lnp=e
            falling = raw is None or s.prev is None or raw <= s.prev*(1+s.slack)
            cand = onp or (newlow and falling) or s.wave.lowest is None
            if cand and (s.kept is None or a >= s.kept[1]): s.kept=(e,a)
        if raw is not None: s.prev=raw
        if s.wave.stopped: return 'stop'
        return None
def replay_fall(R_, **kw):
    s=NewRuleFall(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E

class NewRuleCentre(NewRule):
    """an LW low makes its window's centre epoch a candidate (weights of the last h epochs held)"""
    def step(s, R_, e):
        newlow=False
        if s.src in ('auto','chg'): newlow |= s.feed(e, R_.chg[e], 'chg')
        c=R_.chk[e] if e>=2 else None
        if c is not None:
            if not R_.finite[e]: return 'nonfinite'
            if s.src in ('auto','schg') and e>=3 and R_.chk[e-1] is not None:
                newlow |= s.feed(e, R_.schg[e], 'schg')
            m=metric_of(R_,e,s.metric); a=R_.acc0[e]
            if s.peak is None or m > s.peak: s.peak=m
            onp = m >= s.peak*(1-s.tol)
            if onp: s.lnp=e
            if onp or s.wave.lowest is None:
                if s.kept is None or a >= s.kept[1]: s.kept=(e,a)
        if newlow:
            ce=s.wave.lowest[0]
            if ce>=2 and R_.chk[ce] is not None:
                a=R_.acc0[ce]
                if s.kept is None or a > s.kept[1] or (a == s.kept[1] and ce > s.kept[0]): s.kept=(ce,a)
        if s.wave.stopped: return 'stop'
        return None
def replay_centre(R_, **kw):
    s=NewRuleCentre(**kw)
    for e in range(1,R_.E+1):
        r=s.step(R_,e)
        if r: return e, s.kept[0] if s.kept else e
    return R_.E, s.kept[0] if s.kept else R_.E
