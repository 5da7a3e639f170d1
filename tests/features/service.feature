Feature: The worker service seals its model, verifies before every execution, and stops on corruption
  An orchestrator commits a model by name, clients execute it over HTTP, and every execution is
  preceded by a verification of every sealed shard. A worker whose sealed memory changed must
  refuse the execution, stop, and leave the incident in its audit trail.

  Background:
    Given a worker on loopback with a model directory holding a small BERT model "tiny"

  Scenario: Commit a model by name
    When the orchestrator commits "tiny" with its expected digest
    Then the commit succeeds with a seal record that checks with the worker token
    And the worker is ready with 1 model

  Scenario: A name that escapes the model directory is refused
    When the orchestrator commits "escape"
    Then the response is 400 with code "INVALID_PARAMS"
    And the worker holds no sealed shard

  Scenario: Execute streams the result after every shard is verified
    Given the model "tiny" is committed
    When a client executes "hello world"
    Then the stream has the events started, token, metrics and end in order
    And the started event reports every shard verified
    And the end event holds a unit-length embedding

  Scenario: Corruption found before an execution stops the worker
    Given the model "tiny" is committed
    When a bit of the sealed weights flips while the worker serves
    And a client executes "hello world"
    Then the response is 500 with code "SEAL_VERIFICATION_FAILED"
    And the worker is Stopped and not ready
    And further executions are refused with code "WORKER_STOPPED"
    And the audit log holds the failed verification and the security incident
