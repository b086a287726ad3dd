# breakdown.py MAG.data MAG_FETCHES FLOOR.data FLOOR_FETCHES: per-fetch microseconds by kernel path,
# from two `perf record -F 4000 -g` profiles (third-pass/prof2.sh, 5 s at c=64). 1 sample = 250 us.
import subprocess,re,sys
def load(f):
    out=subprocess.run(['perf','report','-i',f,'--children','--sort','sym','--stdio','--no-call-graph'],capture_output=True,text=True).stdout
    n=None
    for l in out.splitlines():
        m=re.search(r'# Samples: (\d+)([KM]?)',l)
        if m: n=int(m.group(1))*{'':1,'K':1000,'M':10**6}[m.group(2)]
    d={}
    for l in out.splitlines():
        m=re.match(r'\s+([\d.]+)%\s+([\d.]+)%\s+\[(.)\] (.*)',l)
        if m: d[m.group(4).strip()]=float(m.group(1))
    dso=subprocess.run(['perf','report','-i',f,'--no-children','--sort','dso','--stdio','-n'],capture_output=True,text=True).stdout
    k=0; n=0
    for l in dso.splitlines():
        m=re.match(r'\s+([\d.]+)%\s+(\d+)\s+(\S+)',l)
        if m:
            n+=int(m.group(2))
            if 'kernel' in m.group(3): k=float(m.group(1))
    return d,n,k
cats=[('skb build + copy (ip_make_skb)','ip_make_skb'),('loopback delivery to the client (net_rx_action)','net_rx_action'),('  of which GSO segmentation','__udp_gso_segment'),('  of which waking the client (sock_def_readable)','sock_def_readable'),('io_uring task work (multishot recv)','tctx_task_work_run'),('io_uring_enter','__do_sys_io_uring_enter'),('recvmmsg','__x64_sys_recvmmsg'),('sendmmsg (all of the send path)','__x64_sys_sendmmsg'),('eventfd read','ksys_read')]
for f,fetches in [(sys.argv[1],int(sys.argv[2])),(sys.argv[3],int(sys.argv[4]))]:
    d,n,k=load(f)
    us=lambda p: p/100*n*250/fetches
    print(f"{f}: {n} samples, {fetches} fetches, total {us(100):.1f} us/fetch; kernel {us(k):.1f}, user {us(100-k):.1f}")
    for name,sym in cats: print(f"   {name:55s} {us(d.get(sym,0)):6.1f}")
