# diff.py A.data FETCHES_A B.data FETCHES_B: per-symbol self cost per fetch (us), A - B, largest first.
import subprocess,sys,re
def load(f,F):
    out=subprocess.run(['perf','report','-i',f,'--stdio','--no-children','-n','--sort','sym'],capture_output=True,text=True).stdout
    rows={}
    for line in out.splitlines():
        mm=re.match(r'\s+([\d.]+)%\s+(\d+)\s+\[(.)\]\s+(.+)$',line)
        if mm: rows[mm.group(4).strip()]=int(mm.group(2))*250/F
    return rows
a=load(sys.argv[1],int(sys.argv[2])); b=load(sys.argv[3],int(sys.argv[4]))
keys=set(a)|set(b)
d=sorted(keys,key=lambda k: -(a.get(k,0)-b.get(k,0)))
print("sym  mag  floor  diff (us/fetch)")
for k in d[:35]: print(f"{a.get(k,0):7.2f} {b.get(k,0):7.2f} {a.get(k,0)-b.get(k,0):+7.2f}  {k[:90]}")
print('...'); 
for k in d[-8:]: print(f"{a.get(k,0):7.2f} {b.get(k,0):7.2f} {a.get(k,0)-b.get(k,0):+7.2f}  {k[:90]}")
