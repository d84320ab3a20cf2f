# Not part of the suite (Tests/guest/cases): a measurement, about 40 s per kernel. Run it with
#   cp Tests/guest/bench/restricted-cost.sh Tests/guest/cases/ && GUEST_TIMEOUT=400 GUEST_KERNEL=6.1 Tests/guest/run.sh restricted-cost; rm Tests/guest/cases/restricted-cost.sh
# Cost of restricted memory (README table): ab --restricted (QD1 round trips through the kernel's drivers, full
# mapping vs restricted, interleaved rounds) for rng and blk, then 4 KiB O_DIRECT random reads with 1 and 16 jobs
# on a full and on a restricted disk0.
. /tests/lib.sh
have_loopbackd
load_lo
truncate -s 64M /tmp/disk0.img
odirect write /tmp/disk0.img 0 64M 5 >/dev/null 2>&1
write_conf
cat >> /etc/loopbackd.conf <<'CONF'

[device.rng0]
type = "rng"

[device.disk0]
type = "blk"
path = "/tmp/disk0.img"
readonly = true
queue-size = 64
CONF
cp /etc/loopbackd.conf /tmp/base.conf
for dev in rng0 disk0; do
  loopbackd ab -c /etc/loopbackd.conf --device $dev --driver virtio-lo --restricted --requests 4000 --rounds 4 > /tmp/ab.txt 2>/tmp/ab.err || fail "ab $dev: $(tail -n 3 /tmp/ab.err | tr '\n' '|')"
  while read -r l; do info "ab $dev: $l"; done < /tmp/ab.txt
done
for mode in false true; do
  cp /tmp/base.conf /etc/loopbackd.conf
  sed -i "s/^queue-size = 64/queue-size = 64\nrestricted-memory = $mode/" /etc/loopbackd.conf
  loopbackd_start
  wait_for 20 test -b /dev/vda || lb_fail "no /dev/vda"
  for jobs in 1 16; do
    r=$(odirect randread /dev/vda 5 $jobs) || fail "randread"
    info "randread restricted=$mode jobs=$jobs: $r"
  done
  loopbackd_stop TERM
done
pass
