import importlib, os, sys
script = sys.argv[1]
if sys.path and sys.path[0] == "":
    sys.path[0] = os.path.dirname(os.path.realpath(script))
salt_call = None
try:
    from salt.scripts import salt_call
except BaseException:
    pass
for m in """salt.cli.call salt.cli.caller salt.fileclient salt.loader salt.minion salt.state
salt.utils.templates salt.utils.gitfs salt.client.ssh.client salt.utils.cloud salt.modules.cmdmod
salt.modules.file salt.utils.yamlloader_old salt.utils.dns salt.utils.tarfileutil salt.runner
salt.loader.dunder salt.modules.network salt.runners.state""".split():
    try:
        importlib.import_module(m)
    except BaseException:
        pass
data = sys.stdin.buffer.read()
if not data:
    sys.exit(0)
parts = [os.fsdecode(p) for p in data.split(b"\0")[:-1]]
log = os.open(parts[0], os.O_WRONLY | os.O_APPEND)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(log)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.argv = [script] + parts[1:]
if salt_call is None:
    from salt.scripts import salt_call
sys.exit(salt_call())
