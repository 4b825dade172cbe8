#!/usr/bin/env bash
# The whole system on one machine, with no AWS account (issue #5): bake `preseeded` and `bare`
# with the local target, serve real git repositories, boot the images in qemu with the IMDS
# emulator, and watch stackless-init do its work on a real systemd boot:
#   preseeded: ready, highstate passed, the web program answers with the configured text; a config
#              commit restarts it once with the new text; a commit that breaks it (an empty
#              greeting: it refuses to start) is reverted by the agent, which says so on the
#              console, and the web program answers the previous text again; a salt commit is
#              applied on the next tick;
#   bare:      salt is installed at first boot, then the same checks pass;
#   KVM that aborts or hangs (a stand-in qemu): auto falls back to TCG and still reaches ready;
#   private:   the config repository is private (HTTPS with basic auth behind lighttpd, TLS from a
#              test CA); the agent reads its token from moto's SSM (TLS, IAM auth on) with role
#              credentials from a moto STS AssumeRole served by the emulator; the token shows
#              nowhere on the console or in the builder's output;
#   fleet:     the agent reports what it applied on its instance's tags in moto (ec2:CreateTags,
#              role credentials, over TLS); `builder fleet web --wait` on the host sees it converge
#              on a config commit pushed while it runs (exit 0), then fail on a salt commit with a
#              failing state (exit 1, naming the instance);
#   broken user-data: the agent reports the error with its line and column, the boot ends
#              `failed`, the machine stays up (its serial console reaches the login prompt).
# Needs root (debootstrap, chroot, mounts) and qemu; scripts/test.sh runs it after the unit tests.
# Writes the measured figures to out/e2e/summary.json.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/lib/examples.sh
source scripts/lib/examples.sh
builder="${BUILDER:-$repo/target/debug/builder}"
init="${STACKLESS_INIT_STATIC:-$repo/target/x86_64-unknown-linux-musl/release/stackless-init}"
accel="${STACKLESS_E2E_ACCEL:-auto}"
work="$(mktemp -d /tmp/stackless-e2e.XXXXXX)"
pids=()

say() { echo "e2e: $*" >&2; }
fail() {
    say "FAIL: $*"
    for f in "$work"/*.console; do
        [[ -f "$f" ]] && { say "--- last lines of $f ---"; tail -n 40 "$f" >&2; }
    done
    exit 1
}
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    [[ -n "${KEEP_E2E:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step_detail() { # name step -> the detail of that boot step in the agent's result
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(next((s.get("detail") or "" for s in d["status"]["boot"]["steps"] if s["name"]==sys.argv[2]), "no such step"))' "$work/$1.result" "$2"
}
json_field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval("d"+sys.argv[2]))' "$1" "$2"; }

[[ -x "$builder" ]] || fail "no builder at $builder (cargo build -p builder)"
# A private copy: qemu runs `builder relay` per guest connection for as long as the test runs,
# and a rebuild must not swap the binary under it.
cp "$builder" "$work/builder"
builder="$work/builder"
[[ -x "$init" ]] || fail "no static stackless-init at $init (scripts/build-init.sh)"

# 1. Bake both images (reused when nothing that shapes them changed).
declare -A bake_s
for image in preseeded bare; do
    say "baking $image (local)"
    t0=$(date +%s%N)
    "$builder" -q bake "$image" --target local --init-binary "$init" >"$work/bake-$image.out" ||
        fail "baking $image"
    bake_s[$image]=$(( ($(date +%s%N) - t0) / 1000000 ))
    say "$image: $(tail -n1 "$work/bake-$image.out") in ${bake_s[$image]} ms"
done

# 1b. A re-bake of preseeded (--force: as after a template change) takes salt and its dependencies
# from the builder's wheelhouse and apt's packages from its cache: pip downloads and builds
# nothing. Its time goes into the summary (issue 18: from about 62 s to under 30 s).
say "re-baking preseeded (local, --force): salt's wheels come from the builder's wheelhouse"
t0=$(date +%s%N)
"$builder" bake preseeded --target local --force --init-binary "$init" >"$work/rebake.out" 2>&1 ||
    { tail -n 30 "$work/rebake.out" >&2; fail "re-baking preseeded"; }
bake_s[rebake]=$(( ($(date +%s%N) - t0) / 1000000 ))
grep -q "provision: .*installed from the builder's wheelhouse (nothing downloaded or built)" "$work/rebake.out" ||
    { grep "provision: stackless-provision" "$work/rebake.out" >&2; fail "the re-bake did not install salt from the builder's wheelhouse"; }
if grep -q "provision: .*Building wheel for" "$work/rebake.out"; then
    grep "Building wheel for" "$work/rebake.out" >&2
    fail "the re-bake built wheels again: the pip cache was not used"
fi
say "preseeded re-baked in ${bake_s[rebake]} ms, no wheel built"

# The generalising step removed the build host's CA bundle, the pip caches and the build's
# policy-rc.d.
for image in preseeded bare; do
    disk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["artifact"])' "out/$image/manifest-local.json")
    qemu-img convert -O raw "$disk" "$work/check.raw"
    for f in /usr/local/share/ca-certificates/stackless-build-host.crt /usr/sbin/policy-rc.d \
        /var/cache/stackless-pip /root/.cache/pip; do
        if debugfs -R "stat $f" "$work/check.raw" 2>/dev/null | grep -q "Inode:"; then
            fail "$image: $f is still in the baked disk"
        fi
    done
    debugfs -R "stat /usr/local/sbin/stackless-init" "$work/check.raw" 2>/dev/null | grep -q "Inode:" ||
        fail "$image: the check itself is broken: /usr/local/sbin/stackless-init not found in the disk"
    rm -f "$work/check.raw"
done

# 2. A salt repository and a config repository, served by a git daemon on loopback.
git_port=$(free_port)
example_repos "$work"
git daemon --reuseaddr --export-all --base-path="$work/git" --listen=127.0.0.1 --port="$git_port" \
    "$work/git" >"$work/git-daemon.log" 2>&1 &
pids+=($!)
commit() { # repo file content message
    printf '%s\n' "$3" >"$work/$1/$2"
    example_commit "$work/$1" "$4"
}

# The example user-data, with this machine's extra CAs (its HTTPS is intercepted).
ud="$work/user-data.toml"
example_user_data "$ud"
"$builder" -q user-data "$ud" >/dev/null || fail "the e2e user-data does not validate"

# Boots IMAGE in the background, kept running; NAME names its files; sets $pid.
boot_bg() { # name image user-data port
    "$builder" --output json boot "out/$2" --user-data "$3" --keep-running --accel "$accel" \
        --port "$4:8080" --forward "169.254.0.100:9418=127.0.0.1:$git_port" \
        --console-log "$work/$1.console" --no-console --timeout 40m >"$work/$1.json" 2>"$work/$1.err" &
    pid=$!
    pids+=("$pid")
}
# Waits for the agent's result line on NAME's console; prints the result JSON.
wait_result() { # name timeout-seconds
    local deadline=$(( $(date +%s) + $2 ))
    while (( $(date +%s) < deadline )); do
        if line=$(grep -a -m1 'stackless-init-result: ' "$work/$1.console" 2>/dev/null); then
            echo "${line#*stackless-init-result: }" >"$work/$1.result"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || fail "$1: builder boot ended before the agent reported: $(cat "$work/$1.err")"
        sleep 2
    done
    fail "$1: no result from the agent within $2 s"
}
# GET path on port until it answers want (or the timeout).
wait_http() { # port path want timeout-seconds what
    local deadline=$(( $(date +%s) + $4 )) got=""
    while (( $(date +%s) < deadline )); do
        got=$(curl -s --max-time 5 "http://127.0.0.1:$1$2" || true)
        [[ "$got" == "$3" ]] && return 0
        sleep 2
    done
    fail "$5: GET $2 answered '${got}' after $4 s; expected '$3'"
}
stop_boot() { # pid -> sets $rc, the boot's exit code
    kill -TERM "$1"
    rc=0
    wait "$1" || rc=$?
}

greeting_v1="hello from the config repository, v1"
greeting_v2="hello from the config repository, v2"
greeting_v3="hello from the config repository, v3"

# 3-5. preseeded
port=$(free_port)
say "booting preseeded (web on 127.0.0.1:$port)"
boot_bg preseeded preseeded "$ud" "$port"
wait_result preseeded 1200
[[ $(json_field "$work/preseeded.result" '["outcome"]') == ready ]] ||
    fail "preseeded: $(cat "$work/preseeded.result")"
[[ $(json_field "$work/preseeded.result" '["status"]["highstate"]["ok"]') == True ]] ||
    fail "preseeded: the highstate did not pass: $(json_field "$work/preseeded.result" '["status"]["highstate"]')"
wait_http "$port" / "$greeting_v1" 60 "preseeded: the web program"
wait_http "$port" /state salt-v1 10 "preseeded: salt's state"
wait_http "$port" /starts 1 10 "preseeded: started once"
detail=$(step_detail preseeded salt-install)
[[ "$detail" == present* ]] || fail "preseeded: salt should be baked in (salt-install: $detail)"
# The unit starts the agent before the network; the agent waited for it through systemd itself.
detail=$(step_detail preseeded wait-for)
[[ "$detail" == "network-online.target, supervisor.service up after "* ]] ||
    fail "preseeded: the agent should have waited for the network and supervisord (wait-for: $detail)"

say "preseeded: pushing a config commit"
t0=$(date +%s)
commit config web/greeting.txt "$greeting_v2" "greeting v2"
wait_http "$port" / "$greeting_v2" 300 "preseeded: the new greeting"
config_s=$(( $(date +%s) - t0 ))
sleep 5 # a second restart would show up here
wait_http "$port" /starts 2 10 "preseeded: restarted exactly once"

say "preseeded: pushing a config commit that breaks the web program"
good_config=$(git -C "$work/config" rev-parse HEAD)
t0=$(date +%s)
commit config web/greeting.txt "" "an empty greeting: web refuses to start"
bad_config=$(git -C "$work/config" rev-parse HEAD)
# The agent prints each revert on the console as it happens (stackless-init-revert: JSON).
deadline=$(( $(date +%s) + 300 ))
until grep -a 'stackless-init-revert: ' "$work/preseeded.console" 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l.split("stackless-init-revert: ", 1)[1])
    if r["repo"] == "config" and r["from"] == sys.argv[1] and r["to"] == sys.argv[2]:
        sys.exit(0)
sys.exit(1)' "$bad_config" "$good_config"; do
    (( $(date +%s) < deadline )) || fail "preseeded: no revert of $bad_config to $good_config on the console in 300 s"
    sleep 2
done
wait_http "$port" / "$greeting_v2" 120 "preseeded: the previous greeting again after the revert"
revert_s=$(( $(date +%s) - t0 ))
say "preseeded: the bad config commit was reverted and web answers the previous text, ${revert_s} s after the push"
# A newer commit ends the quarantine and is applied (and every later boot starts from a good tip).
commit config web/greeting.txt "$greeting_v3" "greeting v3: fixed"
wait_http "$port" / "$greeting_v3" 300 "preseeded: the fixed greeting once upstream moved past the bad commit"

say "preseeded: pushing a salt commit"
t0=$(date +%s)
sed -i 's/salt-v1/salt-v2/' "$work/salt/web/init.sls"
example_commit "$work/salt" "state v2"
wait_http "$port" /state salt-v2 300 "preseeded: the salt change applied on the next tick"
salt_s=$(( $(date +%s) - t0 ))
stop_boot "$pid"
[[ "$rc" == 0 ]] || fail "preseeded: builder boot exited $rc after Ctrl-C (expected 0, the agent was ready)"
pre_ready_ms=$(json_field "$work/preseeded.json" '["boot_to_result_ms"]')
pre_agent_ms=$(json_field "$work/preseeded.json" '["result"]["total_ms"]')
used_accel=$(json_field "$work/preseeded.json" '["accel"]')
say "preseeded: ready in ${pre_ready_ms} ms (agent ${pre_agent_ms} ms) under $used_accel; config change live in ${config_s} s, salt change in ${salt_s} s"
accel="$used_accel" # the probe's verdict holds for the rest of the run

# 5b. Whatever the host's KVM does, auto reaches ready: a stand-in qemu first on PATH aborts
# (as on a nested host refusing MSR 0x10a) or hangs when given KVM, and runs the real qemu
# otherwise. The probe needs a KVM device that opens, which a stand-in file gives on any host.
real_qemu=$(command -v qemu-system-x86_64) || fail "qemu-system-x86_64 is not installed"
: >"$work/fake-kvm"
standin() { # name behaviour-under-kvm
    mkdir -p "$work/$1-bin"
    cat >"$work/$1-bin/qemu-system-x86_64" <<STANDIN
#!/bin/sh
ulimit -c 0
case " \$* " in
    *" -accel kvm "*) $2;;
esac
exec "$real_qemu" "\$@"
STANDIN
    chmod +x "$work/$1-bin/qemu-system-x86_64"
}
standin kvm-aborts 'echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069" >&2; echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion failed." >&2; kill -ABRT $$'
standin kvm-hangs 'exec sleep 3600'
for kind in kvm-aborts kvm-hangs; do
    say "booting preseeded with a qemu whose KVM $kind (auto must fall back to TCG and reach ready)"
    rc=0
    PATH="$work/$kind-bin:$PATH" XDG_CACHE_HOME="$work/cache-$kind" STACKLESS_KVM_DEVICE="$work/fake-kvm" \
        "$builder" --output json boot out/preseeded --user-data "$ud" --accel auto --kvm-probe 10s \
        --forward "169.254.0.100:9418=127.0.0.1:$git_port" --console-log "$work/$kind.console" \
        --no-console --timeout 20m >"$work/$kind.json" 2>"$work/$kind.err" || rc=$?
    [[ "$rc" == 0 ]] || fail "$kind: builder boot exited $rc: $(tail -n 5 "$work/$kind.err")"
    [[ $(json_field "$work/$kind.json" '["accel"]') == tcg ]] || fail "$kind: $(cat "$work/$kind.json")"
    [[ $(json_field "$work/$kind.json" '["result"]["outcome"]') == ready ]] || fail "$kind: $(cat "$work/$kind.json")"
    why=$(json_field "$work/$kind.json" '["kvm_fallback"]')
    case "$kind" in
        kvm-aborts) [[ "$why" == *SIGABRT*"MSR 0x10a"* && "$why" == *"-cpu host,-arch-capabilities"* ]] ||
            fail "$kind: the fallback does not say qemu aborted on both CPU models: $why" ;;
        kvm-hangs) [[ "$why" == *"printed nothing"* ]] || fail "$kind: the fallback does not say KVM was silent: $why" ;;
    esac
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); sys.exit(v["kvm_cpu"] is not None)' \
        "$work/cache-$kind/stackless/accel-verdict.json" || fail "$kind: the verdict was not cached as KVM unusable"
    say "$kind: ready in $(json_field "$work/$kind.json" '["boot_to_result_ms"]') ms under TCG; $why"
done

# 5c. A private config repository: its token is a SecureString in moto's SSM, read by the agent
# with the instance role the emulator serves (credentials from moto's STS, IAM auth on), over
# TLS from a test CA the user-data's ca_certificates trusts; git gets it through askpass.
venv="$repo/.venv/bin"
[[ -x "$venv/moto_server" ]] || fail "no moto_server in $venv (scripts/install-test-deps.sh)"
tls="$work/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=e2e-ca \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null || fail "openssl: the test CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null || fail "openssl: the server key"
echo "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:169.254.0.101,IP:169.254.0.102" >"$tls/san.ext"
openssl x509 -req -days 2 -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -extfile "$tls/san.ext" -out "$tls/server.pem" 2>/dev/null || fail "openssl: the server certificate"
token="ghp_e2eCANARY$(openssl rand -hex 12)"
moto_port=$(free_port)
"$venv/moto_server" -H 127.0.0.1 -p "$moto_port" -c "$tls/server.pem" -k "$tls/server.key" \
    >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s --cacert "$tls/ca.pem" -o /dev/null "https://127.0.0.1:$moto_port/" && break; sleep 0.2; done
# The role, the parameter, STS credentials for the role; then moto checks every signature.
( umask 077; printf '%s' "$token" | "$venv/python" -c '
import json, sys, boto3, urllib.request, ssl
endpoint, ca, instance_file = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(endpoint_url=endpoint, region_name="eu-west-1", verify=ca,
          aws_access_key_id="AKIASETUPSETUPSETUP1", aws_secret_access_key="setup")
iam, sts, ssm, ec2 = (boto3.client(s, **kw) for s in ("iam", "sts", "ssm", "ec2"))
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
arn = iam.create_role(RoleName="e2e-web", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
iam.put_role_policy(RoleName="e2e-web", PolicyName="read-token", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["ssm:GetParameter", "kms:Decrypt",
                                             "ec2:CreateTags", "ec2:DescribeInstances"], "Resource": "*"}]}))
ssm.put_parameter(Name="/stackless/e2e/git-token", Value=sys.stdin.read(), Type="SecureString")
# The instance the fleet step boots as (5d), tagged with its service.
ami = sorted(i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"])[0]
iid = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance",
      "Tags": [{"Key": "stackless:service", "Value": "web"}]}])["Instances"][0]["InstanceId"]
open(instance_file, "w").write(iid)
out = sts.assume_role(RoleArn=arn, RoleSessionName="e2e")
out["Credentials"]["Expiration"] = out["Credentials"]["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                              headers={"Content-Type": "text/plain"}),
                       context=ssl.create_default_context(cafile=ca)).read()
json.dump({"Credentials": out["Credentials"], "AssumedRoleUser": out["AssumedRoleUser"]}, sys.stdout, default=str)
' "https://127.0.0.1:$moto_port" "$tls/ca.pem" "$work/instance-id" >"$work/role.json" ) ||
    fail "setting up moto's role and parameter"
# The private repository: a copy of the config repository with its own greeting.
mkdir -p "$work/private"
git clone -q --bare "$work/git/config.git" "$work/private/config.git"
git clone -q "$work/private/config.git" "$work/private-config" 2>/dev/null
greeting_private="hello from a private repository"
printf '%s\n' "$greeting_private" >"$work/private-config/web/greeting.txt"
example_commit "$work/private-config" "private greeting"
private_head=$(git -C "$work/private-config" rev-parse HEAD)
printf 'x-access-token:%s\n' "$token" >"$work/private/users"
chmod 600 "$work/private/users"
lighttpd_port=$(free_port)
cat >"$work/private/lighttpd.conf" <<LIGHTTPD
server.document-root = "$work/private"
server.port = $lighttpd_port
server.bind = "127.0.0.1"
server.errorlog = "$work/private/lighttpd.log"
server.modules = ("mod_auth", "mod_authn_file", "mod_alias", "mod_setenv", "mod_cgi", "mod_openssl")
ssl.engine = "enable"
ssl.pemfile = "$tls/server.pem"
ssl.privkey = "$tls/server.key"
alias.url = ("/git" => "/usr/lib/git-core/git-http-backend")
\$HTTP["url"] =~ "^/git" {
    cgi.assign = ("" => "")
    setenv.add-environment = ("GIT_PROJECT_ROOT" => "$work/private", "GIT_HTTP_EXPORT_ALL" => "1")
}
auth.backend = "plain"
auth.backend.plain.userfile = "$work/private/users"
auth.require = ("/git" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
LIGHTTPD
/usr/sbin/lighttpd -D -f "$work/private/lighttpd.conf" >"$work/lighttpd.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s --cacert "$tls/ca.pem" -o /dev/null "https://127.0.0.1:$lighttpd_port/" && break; sleep 0.2; done
# Without the token the repository is closed: the check can fail.
code=$(curl -s --cacert "$tls/ca.pem" -o /dev/null -w '%{http_code}' "https://127.0.0.1:$lighttpd_port/git/config.git/info/refs?service=git-upload-pack")
[[ "$code" == 401 ]] || fail "private: lighttpd answered $code without credentials (expected 401)"
pud="$work/private-user-data.toml"
{
    printf 'ca_certificates = """\n%s\n%s\n"""\n' "$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)" "$(cat "$tls/ca.pem")"
    cat <<UD
minion_id = "web-{instance_id}"
grains = { role = "web", env = "private" }

[salt]
repo = "git://169.254.0.100:9418/salt.git"
ref = "main"

[config]
repo = "https://169.254.0.102:$lighttpd_port/git/config.git"
ref = "main"

[config.credentials]
token_parameter = "/stackless/e2e/git-token"

[aws]
ssm_endpoint = "https://169.254.0.101:$moto_port"
# The agent's report goes to moto too, never to AWS (step 5d checks it).
ec2_endpoint = "https://169.254.0.101:$moto_port"

[[watch]]
paths = ["/var/lib/stackless/repos/config/current/web/*.txt"]
restart = ["web"]
UD
} >"$pud"
"$builder" -q user-data "$pud" >/dev/null || fail "the private user-data does not validate"
port=$(free_port)
say "booting preseeded with a private config repository (token from moto's SSM through the role)"
"$builder" --output json boot out/preseeded --user-data "$pud" --keep-running --accel "$accel" \
    --port "$port:8080" --forward "169.254.0.100:9418=127.0.0.1:$git_port" \
    --forward "169.254.0.101:$moto_port=127.0.0.1:$moto_port" \
    --forward "169.254.0.102:$lighttpd_port=127.0.0.1:$lighttpd_port" \
    --role-credentials "$work/role.json" \
    --console-log "$work/private.console" --no-console --timeout 40m >"$work/private.json" 2>"$work/private.err" &
pid=$!
pids+=("$pid")
wait_result private 1200
[[ $(json_field "$work/private.result" '["outcome"]') == ready ]] || fail "private: $(cat "$work/private.result")"
[[ $(json_field "$work/private.result" '["status"]["repos"]["config"]["commit"]') == "$private_head" ]] ||
    fail "private: the config release is not the private repository's head: $(json_field "$work/private.result" '["status"]["repos"]')"
wait_http "$port" / "$greeting_private" 60 "private: the web program"
stop_boot "$pid"
[[ "$rc" == 0 ]] || fail "private: builder boot exited $rc"
for f in "$work/private.console" "$work/private.json" "$work/private.err"; do
    if grep -a -q -F "$token" "$f"; then fail "private: the token is in $f"; fi
done
private_ms=$(json_field "$work/private.json" '["boot_to_result_ms"]')
say "private: ready in ${private_ms} ms with the private repository; the token is not on the console"

# 5d. Fleet convergence: the agent reports on its instance's tags in moto (CreateTags with the
# role's credentials, over TLS, IAM auth on), and `builder fleet web --wait` on the host, reading
# moto as the same role, sees the instance converge on a config commit pushed while it runs (exit
# 0), then fail on a salt commit whose state fails (exit 1, naming the instance).
iid=$(cat "$work/instance-id")
fud="$work/fleet-user-data.toml"
{ cat "$pud"; printf '\n[sync]\nschedule = "@every 30s"\nsplay = "0s"\n'; } >"$fud"
"$builder" -q user-data "$fud" >/dev/null || fail "the fleet user-data does not validate"
fleet() { # builder fleet ARGS..., as the role, against moto over TLS
    env AWS_ENDPOINT_URL="https://127.0.0.1:$moto_port" SSL_CERT_FILE="$tls/ca.pem" AWS_REGION=eu-west-1 \
        AWS_EC2_METADATA_DISABLED=true \
        AWS_ACCESS_KEY_ID="$(json_field "$work/role.json" '["Credentials"]["AccessKeyId"]')" \
        AWS_SECRET_ACCESS_KEY="$(json_field "$work/role.json" '["Credentials"]["SecretAccessKey"]')" \
        AWS_SESSION_TOKEN="$(json_field "$work/role.json" '["Credentials"]["SessionToken"]')" \
        "$builder" fleet "$@"
}
port=$(free_port)
say "booting preseeded as $iid, reporting to moto's EC2"
"$builder" --output json boot out/preseeded --user-data "$fud" --keep-running --accel "$accel" \
    --instance-id "$iid" \
    --port "$port:8080" --forward "169.254.0.100:9418=127.0.0.1:$git_port" \
    --forward "169.254.0.101:$moto_port=127.0.0.1:$moto_port" \
    --forward "169.254.0.102:$lighttpd_port=127.0.0.1:$lighttpd_port" \
    --role-credentials "$work/role.json" \
    --console-log "$work/fleet.console" --no-console --timeout 40m >"$work/fleet.json" 2>"$work/fleet.err" &
pid=$!
pids+=("$pid")
wait_result fleet 1200
[[ $(json_field "$work/fleet.result" '["outcome"]') == ready ]] || fail "fleet: $(cat "$work/fleet.result")"
fleet web >"$work/fleet-list.out" 2>&1 || fail "fleet: listing: $(cat "$work/fleet-list.out")"
grep -q "$iid.*${private_head:0:12}.*ready" "$work/fleet-list.out" ||
    fail "fleet: the boot's report is not in the listing: $(cat "$work/fleet-list.out")"
say "fleet: pushing a config commit and waiting for the fleet"
greeting_fleet="hello from the fleet step"
printf '%s\n' "$greeting_fleet" >"$work/private-config/web/greeting.txt"
example_commit "$work/private-config" "fleet greeting"
t0=$(date +%s)
rc=0
fleet web --wait --config HEAD --repo "file://$work/private/config.git" --timeout 10m --interval 5s \
    >"$work/fleet-wait.out" 2>&1 || rc=$?
[[ "$rc" == 0 ]] || fail "fleet: builder fleet --wait exited $rc: $(cat "$work/fleet-wait.out")"
fleet_s=$(( $(date +%s) - t0 ))
wait_http "$port" / "$greeting_fleet" 60 "fleet: the new greeting"
say "fleet: converged on the config commit in ${fleet_s} s"
say "fleet: pushing a salt commit with a failing state"
printf '\nfleet-breaks:\n  cmd.run:\n    - name: "false"\n' >>"$work/salt/web/init.sls"
example_commit "$work/salt" "a failing state"
rc=0
fleet web --wait --salt HEAD --repo "file://$work/git/salt.git" --timeout 10m --interval 5s \
    >"$work/fleet-fail.out" 2>&1 || rc=$?
[[ "$rc" == 1 ]] || fail "fleet: builder fleet --wait exited $rc on a failing state (expected 1): $(cat "$work/fleet-fail.out")"
grep -q "failed on salt.*$iid.*highstate" "$work/fleet-fail.out" ||
    fail "fleet: the failure does not name the instance and its problem: $(cat "$work/fleet-fail.out")"
# Put the salt repository back for the boots below.
git -C "$work/salt" -c user.name=stackless -c user.email=stackless@localhost revert --no-edit HEAD >/dev/null
git -C "$work/salt" push -q origin main
stop_boot "$pid"
[[ "$rc" == 0 ]] || fail "fleet: builder boot exited $rc (expected 0: the boot itself was ready)"
say "fleet: the failing state was named: $(tail -n1 "$work/fleet-fail.out")"

# 6. bare: salt is installed at first boot, then the same checks.
port=$(free_port)
say "booting bare (salt is pip-installed at first boot; minutes under TCG)"
boot_bg bare bare "$ud" "$port"
wait_result bare 2400
[[ $(json_field "$work/bare.result" '["outcome"]') == ready ]] || fail "bare: $(cat "$work/bare.result")"
detail=$(step_detail bare salt-install)
[[ "$detail" == installed* ]] || fail "bare: salt was not installed at first boot (salt-install: $detail)"
[[ $(json_field "$work/bare.result" '["status"]["highstate"]["ok"]') == True ]] ||
    fail "bare: the highstate did not pass"
wait_http "$port" / "$greeting_v3" 60 "bare: the web program"
wait_http "$port" /state salt-v2 10 "bare: salt's state"
stop_boot "$pid"
[[ "$rc" == 0 ]] || fail "bare: builder boot exited $rc"
bare_ready_ms=$(json_field "$work/bare.json" '["boot_to_result_ms"]')
bare_agent_ms=$(json_field "$work/bare.json" '["result"]["total_ms"]')
say "bare: ready in ${bare_ready_ms} ms (agent ${bare_agent_ms} ms)"
(( pre_ready_ms < bare_ready_ms )) ||
    fail "preseeded (${pre_ready_ms} ms) should reach ready before bare (${bare_ready_ms} ms): salt is baked in"

# 7. Broken user-data: reported with line and column, boot failed, machine still up.
bad="$work/broken.toml"
printf 'minion_id = "web-{instance_id}"\n\n[sync]\nschedule = "every tuesday"\n' >"$bad"
port=$(free_port)
say "booting preseeded with broken user-data"
boot_bg broken preseeded "$bad" "$port"
wait_result broken 1200
[[ $(json_field "$work/broken.result" '["outcome"]') == failed ]] || fail "broken: $(cat "$work/broken.result")"
err=$(json_field "$work/broken.result" '["error"]')
[[ "$err" =~ user-data:4:[0-9]+ ]] || fail "broken: the error does not name line 4 and its column: $err"
deadline=$(( $(date +%s) + 300 ))
# agetty prints the issue banner (ending in the console's name) right before its prompt; the
# prompt itself has no newline to end its console line. The agent runs beside the gettys, so
# the banner may come before or after its result (on a loaded host the agent is often later).
until grep -a -q "ttyS0$" "$work/broken.console"; do
    (( $(date +%s) < deadline )) || fail "broken: the machine did not reach its serial login after the failure"
    kill -0 "$pid" 2>/dev/null || fail "broken: builder boot ended: $(cat "$work/broken.err")"
    sleep 2
done
# Still up a moment after both: the failure did not take the machine down.
sleep 5
kill -0 "$pid" 2>/dev/null || fail "broken: the machine went down after the failure: $(cat "$work/broken.err")"
stop_boot "$pid"
[[ "$rc" == 1 ]] || fail "broken: builder boot exited $rc (expected 1, failed)"
say "broken user-data: failed as expected: $err"

mkdir -p out/e2e
cat >out/e2e/summary.json <<JSON
{"accel": "$used_accel",
 "bake_ms": {"preseeded": ${bake_s[preseeded]}, "bare": ${bake_s[bare]}, "preseeded_rebake": ${bake_s[rebake]}},
 "boot_to_ready_ms": {"preseeded": $pre_ready_ms, "private": $private_ms, "bare": $bare_ready_ms},
 "agent_boot_ms": {"preseeded": $pre_agent_ms, "bare": $bare_agent_ms},
 "config_change_live_s": $config_s, "bad_config_reverted_s": $revert_s, "salt_change_applied_s": $salt_s,
 "fleet_config_converged_s": $fleet_s,
 "measured_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
say "passed; figures in out/e2e/summary.json:"
cat out/e2e/summary.json >&2
