defmodule ElixirApp.VariablesTest do
  use ExUnit.Case, async: true

  alias ElixirApp.Variables, as: V

  setup do
    session = "elixir_app_test_#{System.unique_integer([:positive])}"
    assert {:ok, %{id: ^session}} = V.new_session(session)
    on_exit(fn -> :dspex_store.delete_session(session) end)
    {:ok, session: session}
  end

  test "the NIF is loaded from the dependency's priv dir" do
    priv = :code.priv_dir(:dspex_bridge)
    assert is_list(priv), "priv_dir(:dspex_bridge) is #{inspect(priv)}"
    assert File.regular?(Path.join(priv, "dspex_nif.so"))
    # A real NIF call (the stub would raise :not_loaded).
    assert is_map(:dspex_store.limits())
  end

  test "float with constraints: out-of-range set fails and changes nothing", %{session: s} do
    assert {:ok, "var_temperature_" <> _} =
             V.register(s, "temperature", :float, 0.7, constraints: %{min: 0.0, max: 2.0})

    assert {:ok, 0.7} = V.get(s, "temperature")
    assert {:ok, 1} = V.set(s, "temperature", 1.5)

    assert {:error, {:invalid_value, msg}} = V.set(s, "temperature", 3.0)
    assert is_binary(msg) and msg != ""
    assert {:error, {:invalid_value, _}} = V.set(s, "temperature", -0.1)
    assert {:error, {:invalid_value, _}} = V.set(s, "temperature", "hot")

    assert {:ok, %{value: 1.5, version: 1, type: :float}} = V.fetch(s, "temperature")

    # An integer is stored as a float.
    assert {:ok, 2} = V.set(s, "temperature", 2)
    assert {:ok, value} = V.get(s, "temperature")
    assert value === 2.0
  end

  test "registering an out-of-range value fails", %{session: s} do
    assert {:error, {:invalid_value, _}} =
             V.register(s, "t", :float, 5.0, constraints: %{min: 0.0, max: 2.0})

    refute :dspex_store.exists(s, "t")
  end

  test "integer: a whole float is stored as an integer", %{session: s} do
    assert {:ok, _} = V.register(s, :max_tokens, :integer, 256, constraints: %{min: 1, max: 4096})
    assert {:ok, 1} = V.set(s, :max_tokens, 3.0)
    assert {:ok, value} = V.get(s, "max_tokens")
    assert value === 3

    assert {:error, {:invalid_value, _}} = V.set(s, :max_tokens, 3.5)
    assert {:error, {:invalid_value, _}} = V.set(s, :max_tokens, 5000)
    assert {:ok, %{value: 3, version: 1}} = V.fetch(s, :max_tokens)
  end

  test "choice", %{session: s} do
    assert {:ok, _} =
             V.register(s, "strategy", :choice, "chain_of_thought",
               constraints: %{choices: ["predict", "chain_of_thought", "react"]}
             )

    assert {:ok, "chain_of_thought"} = V.get(s, "strategy")
    assert {:ok, 1} = V.set(s, "strategy", "react")
    assert {:error, {:invalid_value, _}} = V.set(s, "strategy", "guess")
    assert {:ok, "react"} = V.get(s, "strategy")

    assert {:error, _} = V.register(s, "no_choices", :choice, "a")
  end

  test "expected_version mismatch returns the current version", %{session: s} do
    assert {:ok, _} = V.register(s, "x", :integer, 0)
    assert {:ok, 1} = V.set(s, "x", 10, expected_version: 0)
    assert {:error, {:version_mismatch, 1}} = V.set(s, "x", 20, expected_version: 0)
    assert {:ok, %{value: 10, version: 1}} = V.fetch(s, "x")
    assert {:ok, 2} = V.set(s, "x", 20, expected_version: 1)
    assert {:ok, 20} = V.get(s, "x")
  end

  test "update/3 applies a function with optimistic locking", %{session: s} do
    assert {:ok, _} = V.register(s, "n", :integer, 1)
    assert {:ok, 1} = V.update(s, "n", &(&1 * 10))
    assert {:ok, 10} = V.get(s, "n")
    assert {:error, {:not_found, "missing"}} = V.update(s, "missing", &(&1 + 1))
    assert {:error, {:invalid_value, _}} = V.update(s, "n", fn _ -> "ten" end)
    assert {:ok, %{value: 10, version: 1}} = V.fetch(s, "n")
  end

  test "history and rollback", %{session: s} do
    assert {:ok, _} = V.register(s, "lr", :float, 1.0)
    assert {:ok, 1} = V.set(s, "lr", 2.0, changed_by: :tuner)
    assert {:ok, 2} = V.set(s, "lr", 3.0)

    assert {:ok, history} = V.history(s, "lr")
    assert [{1, 2.0, :tuner}, {0, 1.0, _}] = Enum.map(history, &{&1.version, &1.value, &1.changed_by})

    assert {:ok, 3} = V.rollback(s, "lr", 0)
    assert {:ok, %{value: 1.0, version: 3}} = V.fetch(s, "lr")
    assert {:ok, [%{version: 2, value: 3.0} | _]} = V.history(s, "lr")

    assert {:error, {:version_not_found, 99}} = V.rollback(s, "lr", 99)
    assert {:ok, %{value: 1.0, version: 3}} = V.fetch(s, "lr")
  end

  test "a watch receives every committed change", %{session: s} do
    assert {:ok, _} = V.register(s, "temp", :float, 0.5)
    assert {:ok, _} = V.register(s, "other", :integer, 0)
    assert {:ok, ref} = V.watch(s, ["temp"])
    assert {:ok, ref2} = V.watch(s, ["other"])

    assert {:ok, 1} = V.set(s, "temp", 0.9, changed_by: "optimizer", metadata: %{reason: "test"})

    assert_receive {:dspex_variable, ^ref, ^s, "temp", 0.5, 0.9, meta}
    assert %{version: 1, previous_version: 0, changed_by: "optimizer", metadata: %{reason: "test"}} = meta
    assert is_integer(meta.updated_at)

    # A failed set notifies nobody.
    assert {:error, {:invalid_value, _}} = V.set(s, "temp", "warm")

    # After unwatch no message for "temp"; the later change of "other" is sent
    # by this same process, so it arrives after anything sent for "temp".
    assert :ok = V.unwatch(ref)
    assert {:ok, 2} = V.set(s, "temp", 0.1)
    assert {:ok, 1} = V.set(s, "other", 7)
    assert_receive {:dspex_variable, ^ref2, ^s, "other", 0, 7, %{version: 1}}
    refute_received {:dspex_variable, ^ref, _, _, _, _, _}
    assert :ok = V.unwatch(ref2)

    assert {:error, {:not_found, "nope"}} = V.watch(s, ["nope"])
  end

  test "watch messages match the records of the bridge's public header", %{session: s} do
    require ElixirApp.Messages
    import ElixirApp.Messages

    assert {:ok, _} = V.register(s, "temp", :float, 0.5)
    assert {:ok, ref} = V.watch(s, ["temp"])
    assert {:ok, 1} = V.set(s, "temp", 0.9)

    assert_receive dspex_variable(ref: ^ref, session: ^s, name: "temp", old_value: 0.5, new_value: 0.9,
                                  meta: %{version: 1})

    # a cluster's lost watch, and the lock notices, are plain tagged tuples too
    assert {:dspex_watch_lost, ref, s} == dspex_watch_lost(ref: ref, session: s)
    assert {:dspex_preempted, s, "temp", 7} == dspex_preempted(session: s, variable: "temp", token: 7)
    assert :ok = V.unwatch(ref)
  end

  test "8 concurrent tasks doing 200 compare-and-set increments each", %{session: s} do
    assert {:ok, _} = V.register(s, "counter", :integer, 0)
    calls = :counters.new(1, [:atomics])
    parent = self()

    # The increment yields between the read and the write, so that other tasks
    # run in that window and the compare-and-set really conflicts.
    increment = fn value ->
      :counters.add(calls, 1, 1)
      :erlang.yield()
      value + 1
    end

    tasks =
      for _ <- 1..8 do
        Task.async(fn ->
          send(parent, {:ready, self()})
          receive do: (:go -> :ok)

          for _ <- 1..200 do
            {:ok, version} = V.update(s, "counter", increment, max_retries: :infinity)
            version
          end
        end)
      end

    # Start all tasks at once.
    for %Task{pid: pid} <- tasks, do: assert_receive({:ready, ^pid})
    for %Task{pid: pid} <- tasks, do: send(pid, :go)

    versions = tasks |> Task.await_many(60_000) |> List.flatten()

    assert {:ok, %{value: 1600, version: 1600}} = V.fetch(s, "counter")
    # Every successful compare-and-set produced its own version.
    assert Enum.sort(versions) == Enum.to_list(1..1600)
    # At least one read per commit (more when conflicts were retried; how many
    # depends on scheduling, so the retry itself is tested deterministically below).
    assert :counters.get(calls, 1) >= 1600
  end

  test "update retries when another writer commits between its read and its write", %{session: s} do
    assert {:ok, _} = V.register(s, "c2", :integer, 0)
    calls = :atomics.new(1, [])

    increment = fn value ->
      if :atomics.add_get(calls, 1, 1) == 1 do
        # a concurrent writer wins the race on the first attempt
        assert {:ok, 1} = V.set(s, "c2", 100)
      end

      value + 1
    end

    assert {:ok, 2} = V.update(s, "c2", increment, max_retries: 3)
    assert {:ok, %{value: 101, version: 2}} = V.fetch(s, "c2")
    assert :atomics.get(calls, 1) == 2
  end
end
