"""The client config file (``ferrotunnel client --config FILE.toml``): what it accepts, and a
usage error naming the file, the table and the key for everything else."""

from __future__ import annotations

import pytest

from ferrotunnel.cli.common import UsageError
from ferrotunnel.cli.config_file import MAX_TUNNELS, load_client_file


def write(tmp_path, text: str, name: str = "ft.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_two_tunnel_file_with_tls_and_a_token_file(tmp_path):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("x")
    (tmp_path / "token.txt").write_text("secret\n")
    cfg = load_client_file(str(write(tmp_path, '''
server = "127.0.0.1:7835"
token_file = "token.txt"
[tls]
ca = "certs/ca.pem"
server_name = "localhost"
[[tunnel]]
id = "web"
local = "127.0.0.1:8000"
[[tunnel]]
id = "db"
local = "127.0.0.1:5432"
remote_port = 0
''')))
    assert cfg.server == "127.0.0.1:7835" and cfg.token is None
    assert cfg.token_file == str(tmp_path / "token.txt")  # relative to the file, not the working directory
    assert cfg.tls is not None and cfg.tls.ca == str(tmp_path / "certs" / "ca.pem")
    assert cfg.tls.server_name == "localhost" and not cfg.tls.skip_verify
    assert [(t.id, t.local, t.remote_port) for t in cfg.tunnels] == [
        ("web", ("127.0.0.1", 8000), None), ("db", ("127.0.0.1", 5432), 0)]


@pytest.mark.parametrize("text, where", [
    ('bogus = 1\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "key 'bogus': unknown key"),
    ('[[tunnel]]\nlocal = "127.0.0.1:1"\n[[tunnel]]\nid = "b"\nlocal = "127.0.0.1:2"\nprot = "tcp"\n',
     "tunnel[2]: key 'prot': unknown key"),
    ('[[tunnel]]\nid = "a"\nlocal = "nowhere"\n', "tunnel[1]: key 'local': must be HOST:PORT"),
    ('[[tunnel]]\nid = "a"\n', "tunnel[1]: key 'local': missing"),
    ('[[tunnel]]\nlocal = "127.0.0.1:1"\nremote_port = 70000\n', "tunnel[1]: key 'remote_port': must be a port"),
    ('[[tunnel]]\nlocal = "127.0.0.1:1"\nremote_port = true\n', "key 'remote_port': must be a port"),
    ('[[tunnel]]\nid = "A"\nlocal = "127.0.0.1:1"\n[[tunnel]]\nid = "a"\nlocal = "127.0.0.1:2"\n',
     "tunnel[2]: key 'id': 'a' is also the id of tunnel[1]"),
    ('server = "http://x:1"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "key 'server': must be HOST:PORT"),
    ('server = 5\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "key 'server': must be a non-empty string"),
    ('[tls]\nca = "missing.pem"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "tls: key 'ca': file not found"),
    ('[tls]\nskip_verify = "yes"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "tls: key 'skip_verify': must be true"),
    ('[tls]\nwho = 1\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "tls: key 'who': unknown key"),
    ('server = "a:1"\n', "key 'tunnel': no [[tunnel]] table"),
    ('tunnel = 3\n', "key 'tunnel': must be tables"),
    ('[[tunnel]\n', "not valid TOML"),
    ('token = "s3cret-value"\ntoken_file = "t.txt"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n', "file not found"),
])
def test_bad_files_name_the_file_the_table_and_the_key(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        load_client_file(str(p))
    message = str(err.value)
    assert message.startswith(f"config file {p}: "), message
    assert where in message, message
    assert "s3cret" not in message


def test_a_token_is_never_repeated_in_a_message(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    for text in ('token = 12345\n[[tunnel]]\nlocal = "127.0.0.1:1"\n',
                 'token = "s3cret-value"\ntoken_file = "t.txt"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n'):
        with pytest.raises(UsageError) as err:
            load_client_file(str(write(tmp_path, text)))
        assert "12345" not in str(err.value) and "s3cret" not in str(err.value)
    cfg = load_client_file(str(write(tmp_path, 'token = "s3cret-value"\n[[tunnel]]\nlocal = "127.0.0.1:1"\n')))
    assert cfg.token == "s3cret-value" and "s3cret" not in repr(cfg)


def test_limits_and_unreadable_files(tmp_path):
    many = "".join(f'[[tunnel]]\nid = "t{i}"\nlocal = "127.0.0.1:{i + 1}"\n' for i in range(MAX_TUNNELS + 1))
    with pytest.raises(UsageError, match=f"over the limit of {MAX_TUNNELS}"):
        load_client_file(str(write(tmp_path, many)))
    with pytest.raises(UsageError, match="byte limit"):
        load_client_file(str(write(tmp_path, "# " + "x" * (1024 * 1024 + 1) + "\n")))
    with pytest.raises(UsageError, match="cannot read it"):
        load_client_file(str(tmp_path / "absent.toml"))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('# caf\u00e9\nserver = "h:1"\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=r"not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_client_file(str(latin1))
