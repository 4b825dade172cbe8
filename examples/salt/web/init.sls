# A small web program under supervisord. Its greeting comes from the config repository
# (/var/lib/stackless/repos/config/current/web/greeting.txt), which stackless-init watches and
# restarts the program on; what this state writes is served at /state.
/opt/web/server.py:
  file.managed:
    - source: salt://web/server.py
    - mode: '0755'
    - makedirs: True

/etc/web/state.txt:
  file.managed:
    - contents: "salt-v1"
    - makedirs: True

/etc/supervisor/conf.d/web.conf:
  file.managed:
    - contents: |
        [program:web]
        command=/usr/bin/python3 /opt/web/server.py
        autostart=true
        autorestart=true
        startsecs=1
        stopsignal=TERM
        stdout_logfile=/var/log/supervisor/web.log
        redirect_stderr=true

# Load a new or changed program definition now (later changes are picked up by the agent too).
web-loaded:
  cmd.run:
    - name: supervisorctl update
    - onchanges:
      - file: /etc/supervisor/conf.d/web.conf
