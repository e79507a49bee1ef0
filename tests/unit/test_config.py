import pytest

from nodeagent.config import Config, ConfigError, build_config


def test_defaults_validate():
    cfg = build_config()
    assert cfg == Config()
    assert cfg.effective_ca_address == cfg.xds_address


def test_env_overrides_file_and_flags_override_env(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("node_name: from-file\nlog_level: debug\n")
    cfg = build_config(
        file=str(f), env={"NODE_NAME": "from-env"}, overrides={"log_level": "warning"}
    )
    assert cfg.node_name == "from-env"
    assert cfg.log_level == "warning"


def test_bad_value_names_field_and_source(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("redirect_backend: nftables\n")
    with pytest.raises(ConfigError, match=r"agent.yaml: field 'redirect_backend': must be one of"):
        build_config(file=str(f))


def test_unknown_file_field_is_refused(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("node_nmae: x\n")
    with pytest.raises(ConfigError, match="unknown field 'node_nmae'"):
        build_config(file=str(f))


def test_bad_env_integer_is_refused():
    with pytest.raises(ConfigError, match="environment: field 'secret_ttl_seconds'"):
        build_config(env={"SECRET_TTL_SECONDS": "soon"})


def test_bad_address_is_refused():
    with pytest.raises(ConfigError, match="admin_address"):
        build_config(overrides={"admin_address": "localhost"})


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.node_name = "x"  # type: ignore[misc]


def test_node_id_has_ztunnel_shape():
    cfg = build_config(env={"INSTANCE_IP": "10.0.0.5", "POD_NAME": "na-1"})
    assert cfg.xds_node_id == "ztunnel~10.0.0.5~na-1.istio-system~istio-system.svc.cluster.local"


def test_kube_settings_come_from_their_env_names():
    cfg = build_config(
        env={
            "KUBE_API": "On",
            "KUBE_API_ADDRESS": "https://10.0.0.1:6443",
            "KUBE_TOKEN": "/t",
            "KUBE_ROOT_CA": "/ca",
            "DAEMONSET_NAME": "agent",
        }
    )
    assert (cfg.kube_api, cfg.kube_api_address) == ("on", "https://10.0.0.1:6443")
    assert (cfg.kube_token_path, cfg.kube_root_ca, cfg.daemonset_name) == ("/t", "/ca", "agent")
    assert Config().kube_api == "auto" and Config().daemonset_name == "nodeagent"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"KUBE_API": "sometimes"}, "kube_api"),
        ({"KUBE_API_ADDRESS": "10.0.0.1:6443"}, "kube_api_address"),
    ],
)
def test_bad_kube_settings_name_the_field(env, field):
    with pytest.raises(ConfigError, match=f"environment: field '{field}'"):
        build_config(env=env)


def test_empty_daemonset_name_is_refused_from_a_file(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("daemonset_name: ''\n")
    with pytest.raises(ConfigError, match="field 'daemonset_name': must not be empty"):
        build_config(file=str(f))


def test_a_broken_settings_file_is_one_line_with_its_line_and_column(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("log_level: debug\nnode_name: [node1\n")
    with pytest.raises(ConfigError) as err:
        build_config(file=str(f))
    assert str(err.value).startswith(f"{f}:3:1: YAML syntax error: ")
    assert "\n" not in str(err.value)


def test_keepalive_and_hbone_bounds_come_from_a_file(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text(
        "xds_keepalive_time: 45\nhbone_preface_timeout: 2.5\nhbone_idle_timeout: 60\n"
        "hbone_max_connections: 100\nhbone_max_connections_per_identity: 10\n"
    )
    cfg = build_config(file=str(f))
    assert cfg.xds_keepalive_time == 45.0 and cfg.xds_keepalive_timeout == 10.0
    assert (cfg.hbone_preface_timeout, cfg.hbone_idle_timeout) == (2.5, 60.0)
    assert (cfg.hbone_max_connections, cfg.hbone_max_connections_per_identity) == (100, 10)


@pytest.mark.parametrize(
    "field", ["xds_keepalive_time", "hbone_handshake_timeout", "hbone_preface_timeout"]
)
def test_a_zero_wait_is_refused_naming_the_field(field):
    with pytest.raises(ConfigError, match=f"flags: field '{field}': must be positive"):
        build_config(overrides={field: 0})


def test_per_identity_limit_above_the_total_is_refused():
    with pytest.raises(ConfigError, match="'hbone_max_connections_per_identity': 20 is more"):
        build_config(
            overrides={"hbone_max_connections": 10, "hbone_max_connections_per_identity": 20}
        )
