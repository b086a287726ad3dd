# breakdown.py PERF_DATA FETCHES SYM1,SYM2,...: microseconds per fetch under each kernel symbol
# (children) and user space in all, from a `perf record -F 4000` profile (prof.sh).
import subprocess,sys,re
f,F=sys.argv[1],int(sys.argv[2])
out=subprocess.run(['perf','report','-i',f,'--stdio','--children','-n','-g','none','--sort','sym'],capture_output=True,text=True).stdout
tot=None
m=re.search(r'# Samples: (\d+)',out)
# Samples line may be like "# Samples: 5K of event 'cpu-clock'"
rows={}
for line in out.splitlines():
    mm=re.match(r'\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)\s+\[(.)\]\s+(\S+)',line)
    if mm: rows[mm.group(5)]=(float(mm.group(1)),float(mm.group(2)),int(mm.group(3)),mm.group(4))
# total samples from self counts
tot=sum(v[2] for v in rows.values())
print(f"{f}: {tot} samples, {tot*250/F:.1f} us/fetch")
keys=sys.argv[3].split(',')
for k in keys:
    if k in rows: print(f"  {k:34s} {rows[k][0]*tot*2.5/F:7.2f} us/fetch (children)")
user=sum(v[2] for v in rows.values() if v[3]=='.')
print(f"  user-space self total {user*250/F:7.2f} us/fetch")
