Feature: Sealed shards in device memory
  A worker seals model bytes into device memory and proves, before use, that they are intact.

  Background:
    Given a manager on the host backend with 64 MiB of capacity

  Scenario: Seal and verify a shard
    When I seal 5 MiB of model bytes
    Then the shard verifies
    And its seal record checks out with the worker token

  Scenario: Corrupted VRAM is detected and located
    Given a sealed shard of 5 MiB
    When one bit at byte 3000000 flips in device memory
    Then verification fails with a digest mismatch
    And the corrupted range contains byte 3000000

  Scenario: A tampered seal is refused
    Given a sealed shard of 1 MiB
    When someone edits the shard's model reference
    Then verification fails because the tag does not match

  Scenario: Not enough VRAM
    Given a sealed shard of 40 MiB
    When I try to seal 30 MiB more
    Then the seal fails with InsufficientVram that may be retried
    And no additional memory is in use
