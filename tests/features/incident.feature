Feature: Security incident when sealed VRAM is found corrupted
  A worker whose sealed memory changed can no longer be trusted. It must stop at once, leave
  evidence in the audit trail, tell someone, and refuse every further request until restarted.

  Background:
    Given an audit log for worker "w-1"
    And a worker lifecycle with an incident callback
    And the worker has loaded and verified all its shards

  Scenario: Corruption found during execution stops the worker
    When verification of shard "shard-7" finds corrupted bytes during execution
    Then the worker is "Stopped"
    And the incident callback was called once for shard "shard-7"
    And an error line for shard "shard-7" was logged on "vram_residency.incident"
    And the audit log holds a critical SecurityIncident for shard "shard-7"
    And the audit log records the move from "Executing" to "Stopped"
    And new work is refused because the worker is stopped
    And the audit log verifies with the worker token

  Scenario Outline: Every integrity error is a security incident
    When the worker reports a <error> for shard "shard-3"
    Then the worker is "Stopped"
    And the incident callback was called once for shard "shard-3"
    And the audit log holds a critical SecurityIncident for shard "shard-3"
    And new work is refused because the worker is stopped

    Examples:
      | error                  |
      | SealVerificationFailed |
      | IntegrityViolation     |
      | PolicyViolation        |

  Scenario: A failing incident callback does not keep the worker running
    Given the incident callback fails
    When verification of shard "shard-1" finds corrupted bytes during execution
    Then the worker is "Stopped"
    And the callback failure was logged on "vram_residency.incident"
    And new work is refused because the worker is stopped

  Scenario: The worker stops even when the incident cannot be written
    Given the audit disk is full
    When verification of shard "shard-2" finds corrupted bytes during execution
    Then the worker is "Stopped"
    And the incident callback was called once for shard "shard-2"
    And the incident says its audit record could not be written
    And new work is refused because the worker is stopped

  Scenario: Only a restart leaves Stopped
    When verification of shard "shard-4" finds corrupted bytes during execution
    And the worker tries to load its shards again
    Then that is refused because the worker is stopped
    When the worker is restarted with a new lifecycle
    Then the worker is "Starting"
    And after loading and verifying its shards it takes work again
