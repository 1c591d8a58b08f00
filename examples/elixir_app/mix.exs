defmodule ElixirApp.MixProject do
  use Mix.Project

  # An example Elixir client of the dspex_bridge Erlang application (the
  # repository root, two levels up). The dependency is a path dependency built
  # by rebar3: Mix runs `$MIX_REBAR3 bare compile` in the repository root, which
  # also runs the rebar.config pre_hook `make -C c_src` that builds
  # priv/dspex_nif.so. No Hex package is used, so this works offline.
  def project do
    [
      app: :elixir_app,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      deps: deps()
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end

  defp deps do
    [
      {:dspex_bridge, path: "../..", manager: :rebar3}
    ]
  end
end
