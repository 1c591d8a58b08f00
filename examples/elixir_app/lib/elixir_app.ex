defmodule ElixirApp do
  @moduledoc """
  Example Elixir client of the `dspex_bridge` Erlang application.

  See `ElixirApp.Variables` for a small wrapper around `:dspex_store`, the
  native (NIF-backed) per-session variable store.
  """
end

defmodule ElixirApp.Variables do
  @moduledoc """
  A thin, idiomatic Elixir wrapper around `:dspex_store`.

  Sessions are identified by binaries; variables by a binary (or ASCII atom)
  name, or by the id returned from `register/5`. Options are given as keyword
  lists (or maps) and passed on as maps. Every function returns what
  `:dspex_store` returns: `{:ok, result}` or `{:error, reason}`, with the
  reasons documented in `dspex_store` (for instance
  `{:invalid_value, message}` or `{:version_mismatch, current_version}`).

      {:ok, _info} = ElixirApp.Variables.new_session("s1")
      {:ok, _id} = ElixirApp.Variables.register("s1", "temperature", :float, 0.7,
                                                constraints: %{min: 0.0, max: 2.0})
      {:ok, 1} = ElixirApp.Variables.set("s1", "temperature", 1.2)
      {:ok, 1.2} = ElixirApp.Variables.get("s1", "temperature")
      {:ok, 2} = ElixirApp.Variables.update("s1", "temperature", &(&1 / 2))
  """

  @type session :: binary()
  @type key :: binary() | atom()
  @type opts :: keyword() | map()

  @default_max_retries 1_000

  @doc """
  Creates the session `id` (or returns the existing one).

  Options: `:ttl` (seconds or `:infinity`, default 3600), `:metadata` (a map).
  """
  @spec new_session(session(), opts()) :: {:ok, map()} | {:error, term()}
  def new_session(id, opts \\ []) when is_binary(id), do: :dspex_store.create_session(id, to_map(opts))

  @doc "Deletes the session and all its variables."
  @spec delete_session(session()) :: :ok | {:error, :session_not_found}
  def delete_session(id), do: :dspex_store.delete_session(id)

  @doc """
  Registers the variable `name` of `type` (`:float`, `:integer`, `:string`,
  `:boolean`, `:choice`, `:module`, `:embedding` or `:tensor`) with its initial
  `value`, at version 0. Returns `{:ok, variable_id}`.

  Options: `:constraints` (e.g. `%{min: 0.0, max: 1.0}`, or
  `%{choices: ["a", "b"]}` for a `:choice`), `:metadata`, `:description`,
  `:history_limit`, `:changed_by`.
  """
  @spec register(session(), key(), atom(), term(), opts()) :: {:ok, binary()} | {:error, term()}
  def register(session, name, type, value, opts \\ []),
    do: :dspex_store.register(session, name, type, value, to_map(opts))

  @doc "Returns `{:ok, value}`: the current value of the variable."
  @spec get(session(), key()) :: {:ok, term()} | {:error, term()}
  def get(session, key), do: :dspex_store.get_value(session, key)

  @doc """
  Returns `{:ok, variable}`: the whole variable as a map (`:value`,
  `:version`, `:type`, `:constraints`, `:metadata`, timestamps...).
  """
  @spec fetch(session(), key()) :: {:ok, map()} | {:error, term()}
  def fetch(session, key), do: :dspex_store.get(session, key)

  @doc """
  Sets a new value and returns `{:ok, new_version}`. The value is validated
  against the type and constraints; a failed set changes nothing.

  Options: `:expected_version` (optimistic locking: a mismatch returns
  `{:error, {:version_mismatch, current_version}}`), `:metadata` (merged into
  the variable's metadata), `:changed_by`.
  """
  @spec set(session(), key(), term(), opts()) :: {:ok, non_neg_integer()} | {:error, term()}
  def set(session, key, value, opts \\ []),
    do: :dspex_store.set(session, key, value, to_map(opts))

  @doc """
  Applies `fun` to the current value and stores the result, with optimistic
  locking: the write carries the version that was read as `expected_version`,
  and on `{:version_mismatch, _}` the variable is read again and `fun` applied
  again. `fun` may thus run several times and must have no side effects.

  Returns `{:ok, new_version}`, the first other error of the read or the set,
  or `{:error, {:too_many_retries, n}}` after `:max_retries` (default
  #{@default_max_retries}, or `:infinity`) conflicts. Other options are passed
  to `set/4`.
  """
  @spec update(session(), key(), (term() -> term()), opts()) ::
          {:ok, non_neg_integer()} | {:error, term()}
  def update(session, key, fun, opts \\ []) when is_function(fun, 1) do
    opts = to_map(opts)
    {max_retries, set_opts} = Map.pop(opts, :max_retries, @default_max_retries)
    do_update(session, key, fun, set_opts, max_retries, 0)
  end

  defp do_update(session, key, fun, set_opts, max_retries, attempt) do
    with {:ok, %{value: value, version: version}} <- :dspex_store.get(session, key) do
      case :dspex_store.set(session, key, fun.(value), Map.put(set_opts, :expected_version, version)) do
        {:error, {:version_mismatch, _}} when attempt < max_retries ->
          do_update(session, key, fun, set_opts, max_retries, attempt + 1)

        {:error, {:version_mismatch, _}} ->
          {:error, {:too_many_retries, attempt}}

        other ->
          other
      end
    end
  end

  @doc "Archived (earlier) versions, newest first: a list of maps with `:version` and `:value`."
  @spec history(session(), key()) :: {:ok, [map()]} | {:error, term()}
  def history(session, key), do: :dspex_store.history(session, key)

  @doc """
  Makes the value of an earlier `version` current again, as a new version.
  Returns `{:ok, new_version}` or `{:error, {:version_not_found, version}}`.
  """
  @spec rollback(session(), key(), non_neg_integer(), opts()) ::
          {:ok, non_neg_integer()} | {:error, term()}
  def rollback(session, key, version, opts \\ []),
    do: :dspex_store.rollback(session, key, version, to_map(opts))

  @doc """
  Subscribes `pid` (default: the caller) to changes of the variables `keys`.
  Each commit sends
  `{:dspex_variable, ref, session, name, old_value, new_value, meta}` where
  `meta` has `:version`, `:previous_version`, `:updated_at`, `:changed_by` and
  `:metadata`. Returns `{:ok, ref}`.
  """
  @spec watch(session(), [key()], pid()) :: {:ok, reference()} | {:error, term()}
  def watch(session, keys, pid \\ self()) when is_list(keys) do
    case :dspex_store.watch(session, keys, pid) do
      {:error, _} = error -> error
      ref -> {:ok, ref}
    end
  end

  @doc "Ends a watch (idempotent)."
  @spec unwatch(reference()) :: :ok
  def unwatch(ref), do: :dspex_store.unwatch(ref)

  defp to_map(opts) when is_map(opts), do: opts
  defp to_map(opts) when is_list(opts), do: Map.new(opts)
end

defmodule ElixirApp.Messages do
  @moduledoc """
  The messages `dspex_bridge` sends to a process, as Elixir records, taken
  from the bridge's public header `include/dspex_bridge.hrl` at compile time
  (so they cannot drift from what the bridge sends).

      require ElixirApp.Messages
      import ElixirApp.Messages

      receive do
        dspex_variable(ref: ^ref, name: name, new_value: value) -> {name, value}
        dspex_watch_lost(ref: ^ref) -> :watch_again
      end

  Records: `dspex_variable` (`ref`, `session`, `name`, `old_value`,
  `new_value`, `meta`), `dspex_watch_lost` (`ref`, `session`),
  `dspex_preempted` and `dspex_lock_expired` (`session`, `variable`, `token`).
  """
  require Record

  @hrl "dspex_bridge/include/dspex_bridge.hrl"

  for name <- [:dspex_variable, :dspex_watch_lost, :dspex_preempted, :dspex_lock_expired] do
    Record.defrecord(name, Record.extract(name, from_lib: @hrl))
  end
end

