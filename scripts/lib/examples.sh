# Shared by scripts/quickstart.sh and tests/e2e-local.sh: the example repositories and user-data.
# Source it; it defines functions only.

# example_repos DIR: bare repositories DIR/git/{salt,config}.git made from examples/, with
# working clones in DIR/{salt,config} to commit from.
example_repos() {
    local dir="$1" r
    mkdir -p "$dir/git"
    for r in salt config; do
        git init -q --bare -b main "$dir/git/$r.git"
        git clone -q "$dir/git/$r.git" "$dir/$r" 2>/dev/null
        cp -r "examples/$r/." "$dir/$r/"
        git -C "$dir/$r" add -A
        example_commit "$dir/$r" "$r: from examples/"
    done
}

# example_commit CLONE MESSAGE: commits everything in the clone and pushes it.
example_commit() {
    git -C "$1" add -A
    git -C "$1" -c user.name=stackless -c user.email=stackless@localhost commit -q -m "$2"
    git -C "$1" push -q origin main
}

# example_user_data OUT: examples/user-data.toml, preceded by the host's extra CAs when it has
# any (a machine whose HTTPS goes through an intercepting proxy hands them to the instance, or a
# bare image could not pip-install salt at first boot).
example_user_data() {
    local extra
    extra=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
    {
        if [[ -n "$extra" ]]; then printf 'ca_certificates = """\n%s\n"""\n' "$extra"; fi
        cat examples/user-data.toml
    } >"$1"
}

# free_port: a free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
