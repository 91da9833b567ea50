"""Read-only spot pre-flight: how likely spot capacity is, and what it costs right now.

Two EC2 reads (spot placement scores, the latest spot price per zone). Offline, without
credentials or without permission it says it could not check and why; it never raises, and its
short timeouts without retries keep `plan` fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

#: Seconds: a plan must not hang on an unreachable endpoint.
CONNECT_TIMEOUT = 3
READ_TIMEOUT = 5
PRICE_LOOKBACK = timedelta(hours=6)
PRODUCT = "Linux/UNIX"


@dataclass(frozen=True)
class SpotPreflight:
    checked: bool
    reason: str
    #: [{"region": ..., "availability_zone": ... or None, "score": 1-10}], best first
    placement_scores: list = field(default_factory=list)
    #: zone -> latest spot price in USD per hour
    current_prices: dict[str, float] = field(default_factory=dict)


def _client(region: str):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                    retries={"max_attempts": 1, "mode": "standard"})
    return boto3.client("ec2", region_name=region, config=config)


def spot_preflight(instance_type: str, region: str, target_capacity: int = 1) -> SpotPreflight:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:
        return SpotPreflight(False, "could not check: boto3 is not installed")
    if boto3.session.Session().get_credentials() is None:
        return SpotPreflight(False, "could not check: no AWS credentials")
    try:
        ec2 = _client(region)
        scores = ec2.get_spot_placement_scores(
            InstanceTypes=[instance_type], TargetCapacity=target_capacity, TargetCapacityUnitType="units",
            SingleAvailabilityZone=True, RegionNames=[region],
        )["SpotPlacementScores"]
        history = ec2.describe_spot_price_history(
            InstanceTypes=[instance_type], ProductDescriptions=[PRODUCT],
            StartTime=datetime.now(timezone.utc) - PRICE_LOOKBACK,
        )["SpotPriceHistory"]
    except NoCredentialsError:
        return SpotPreflight(False, "could not check: no AWS credentials")
    except ClientError as exc:
        error = exc.response.get("Error", {})
        return SpotPreflight(False, f"could not check: {error.get('Code', 'error')}: {error.get('Message', exc)}")
    except BotoCoreError as exc:
        return SpotPreflight(False, f"could not check: {exc}")

    latest: dict[str, tuple[datetime, float]] = {}
    for entry in history:
        zone, when = entry["AvailabilityZone"], entry["Timestamp"]
        if zone not in latest or when > latest[zone][0]:
            latest[zone] = (when, float(entry["SpotPrice"]))
    placement = sorted(
        ({"region": s.get("Region"), "availability_zone": s.get("AvailabilityZoneId"), "score": s.get("Score")}
         for s in scores),
        key=lambda s: -(s["score"] or 0),
    )
    prices = {zone: price for zone, (_, price) in sorted(latest.items())}
    best = placement[0]["score"] if placement else None
    reason = (f"placement score {best}/10 for {target_capacity}x {instance_type} in {region}"
              if best is not None else f"no placement score for {instance_type} in {region}")
    if not prices:
        reason += "; no spot price in the last 6 hours (not offered on spot here?)"
    return SpotPreflight(True, reason, placement, prices)
