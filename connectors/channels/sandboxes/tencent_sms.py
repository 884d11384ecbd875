"""Sandbox for Tencent Cloud SMS SendSms (API 3.0): verifies the TC3-HMAC-SHA256 Authorization over the headers
it names, answers everything in the Response envelope with HTTP 200 like the real gateway, and posts status
callback arrays to Loopcast's receipt URL with the shared token (Tencent's callback itself is unsigned).

A call takes up to 200 numbers, all mainland or all not, with one TemplateParamSet for all: each number is its
own Received item (with a "batch" flag when the call had more than one, and the message id only when alone: the
one SessionContext names no single message then), its own SerialNo and status, and the call's reports go back
as one callback. A mainland number that is not +86 and 11 digits fails alone, as Tencent's per-number check
does."""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import web

from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.tencent_sms import ALGORITHM, API_VERSION, BATCH_MOST, SERVICE, tc3_signature

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
MAINLAND_MOBILE = re.compile(r"^\+861\d{10}$")
AUTHORIZATION = re.compile(
    rf"^{ALGORITHM} Credential=(?P<id>[^/]+)/(?P<date>\d{{4}}-\d{{2}}-\d{{2}})/{SERVICE}/tc3_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)
MAX_SKEW_S = 300
# Enough country codes to split a number into the callback's nationcode and mobile (longest first).
COUNTRY_CODES = ("852", "853", "886", "86", "81", "82", "65", "60", "44", "1")


def envelope(body: dict, status: int = 200, request_id: str | None = None) -> web.Response:
    return web.json_response({"Response": {**body, "RequestId": request_id or str(uuid.uuid4())}}, status=status)


def error(code: str, message: str, status: int = 200) -> web.Response:
    return envelope({"Error": {"Code": code, "Message": message}}, status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":  # API 3.0 reports its frequency limit in the envelope, with HTTP 200
        return error("RequestLimitExceeded", "Your current request times exceeds the frequency limit for a second.")
    if fault == "outage":
        return error("InternalError", "The service is temporarily unavailable.", status)
    return error("InternalError", "An internal error has occurred. Retry your request.", status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    separator = "&" if "?" in ctx.receipt_url else "?"
    receipt_url = f"{ctx.receipt_url}{separator}token={quote(credentials.receipt_token.get_secret_value(), safe='')}"

    def report(item: Received, status: str) -> dict:
        ok = status == "delivered"
        number = item.body["PhoneNumber"]
        nationcode = next((code for code in COUNTRY_CODES if number.startswith(f"+{code}")), number[1:3])
        return {
            "user_receive_time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "nationcode": nationcode,
            "mobile": number[1 + len(nationcode) :],
            "report_status": "SUCCESS" if ok else "FAIL",
            "errmsg": "DELIVRD" if ok else "UNDELIV",
            "description": "用户短信送达成功" if ok else "用户短信未送达",
            "sid": item.provider_message_id,
        }

    async def send_receipts(fates: list[tuple[Received, str]]) -> None:
        # One callback holds many reports (Tencent's own note on the callback).
        body = json.dumps([report(item, status) for item, status in fates], ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        async with box.client().post(receipt_url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"status callback answered {response.status}")

    def authenticate(request: web.Request, payload: bytes) -> web.Response | None:
        match = AUTHORIZATION.match(request.headers.get("Authorization", ""))
        if match is None:
            return error("AuthFailure.InvalidAuthorization", "Authorization header is not in TC3 format.")
        signed = match["signed"].split(";")
        if "content-type" not in signed or "host" not in signed:
            return error("AuthFailure.InvalidAuthorization", "SignedHeaders must include content-type and host.")
        if match["id"] != credentials.secret_id:
            return error("AuthFailure.SecretIdNotFound", "The SecretId is not found, please ensure it is correct.")
        try:
            timestamp = int(request.headers.get("X-TC-Timestamp", ""))
        except ValueError:
            return error("MissingParameter", "The request is missing a required header `X-TC-Timestamp`.")
        if abs(time.time() - timestamp) > MAX_SKEW_S:
            return error(
                "AuthFailure.SignatureExpire", "Signature expired. Timestamp and server time differ by >5 min."
            )
        if match["date"] != time.strftime("%Y-%m-%d", time.gmtime(timestamp)):
            return error("AuthFailure.SignatureFailure", "The credential scope date does not match X-TC-Timestamp.")
        expected = tc3_signature(
            credentials.secret_key.get_secret_value(), request.headers, signed, payload, timestamp, request.method
        )
        if not hmac.compare_digest(expected, match["signature"]):
            return error(
                "AuthFailure.SignatureFailure",
                "The provided credentials could not be validated. Please check your signature is correct.",
            )
        return None

    async def api(request: web.Request) -> web.Response:
        payload = await request.read()
        refused = authenticate(request, payload)
        if refused is not None:
            box.rejected += 1
            return refused
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        action, version = request.headers.get("X-TC-Action", ""), request.headers.get("X-TC-Version")
        if action.lower() != "sendsms" or version != API_VERSION:
            return error("InvalidAction", f"The action `{action}` version `{version}` is not found.")
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return error("InvalidParameter", "The request body is not a JSON object.")
        if body.get("PhoneNumberSet") == []:
            return error("MissingParameter.EmptyPhoneNumberSet", "The PhoneNumberSet is empty.")
        for name in ("PhoneNumberSet", "SmsSdkAppId", "TemplateId"):
            if not body.get(name):
                return error("MissingParameter", f"The request is missing a required parameter `{name}`.")
        if not str(body["SmsSdkAppId"]).isdigit():
            return error("InvalidParameterValue.SdkAppIdNotExist", "SdkAppId does not exist.")
        if not str(body["TemplateId"]).isdigit():
            return error("FailedOperation.TemplateIncorrectOrUnapproved", "The template is not approved or missing.")
        numbers, params = body["PhoneNumberSet"], body.get("TemplateParamSet") or []
        if not isinstance(numbers, list) or not isinstance(params, list):
            return error("InvalidParameter", "PhoneNumberSet and TemplateParamSet are arrays.")
        if not all(isinstance(x, str) for x in numbers + params):
            return error("InvalidParameterValue", "PhoneNumberSet and TemplateParamSet hold strings.")
        if len(numbers) > BATCH_MOST:
            return error("LimitExceeded.PhoneNumberCountLimit", f"PhoneNumberSet holds at most {BATCH_MOST} numbers.")
        if len({number.startswith("+86") for number in numbers}) > 1:
            return error(
                "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber",
                "The request holds both mainland China and global numbers; send them apart.",
            )
        if numbers[0].startswith("+86") and not body.get("SignName"):
            return error("MissingParameter", "The request is missing a required parameter `SignName`.")
        request_id, context = str(uuid.uuid4()), body.get("SessionContext", "")
        batch = len(numbers) > 1
        content = f"【{body.get('SignName') or ''}】" + "".join(params)
        fee = 1 if len(content) <= 70 else -(-len(content) // 67)
        items, statuses = [], []
        for number in numbers:
            mainland = number.startswith("+86")
            if not E164.match(number) or (mainland and not MAINLAND_MOBILE.match(number)):
                code, text, serial, charged = "InvalidParameterValue.IncorrectPhoneNumber", "手机号格式错误", "", 0
            else:
                record = {
                    # One SessionContext for the whole call: it names a message only when the call has one.
                    "message_id": None if batch else context or None,
                    "PhoneNumber": number,
                    "SignName": body.get("SignName"),
                    "TemplateId": body["TemplateId"],
                    "TemplateParamSet": params,
                    "RequestId": request_id,  # which call it came in
                }
                if batch:
                    record["batch"] = True
                item = box.record(record, None)
                # SerialNos look like "2640:336718591617034583214098019": a shard, then digits.
                item.provider_message_id = f"2640:{336_718_591_617_034_583_000 + int(item.provider_message_id[-10:])}"
                items.append(item)
                code, text, serial, charged = "Ok", "send success", item.provider_message_id, fee
            statuses.append(
                {
                    "SerialNo": serial,
                    "PhoneNumber": number,
                    "Fee": charged,
                    "SessionContext": context,
                    "Code": code,
                    "Message": text,
                    "IsoCode": "CN" if mainland else "",
                }
            )
        box.schedule_receipts(items, send_receipts)
        return envelope({"SendStatusSet": statuses}, request_id=request_id)

    return [web.post("/", api)]
