# The dspex_bridge application (a dependency) is started by `mix test`; make
# sure its NIF really loaded before any test runs, with a clear message if not.
{:ok, _} = Application.ensure_all_started(:dspex_bridge)

case :code.ensure_loaded(:dspex_nif) do
  {:module, :dspex_nif} ->
    :ok

  other ->
    raise "dspex_nif did not load (#{inspect(other)}); priv_dir is " <>
            inspect(:code.priv_dir(:dspex_bridge))
end

ExUnit.start()
