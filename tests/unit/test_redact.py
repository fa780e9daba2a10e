"""Personal data is replaced before text is sent to the API; what the label needs stays."""

from __future__ import annotations

from triage.classify.redact import Redactor, redact


def test_contact_details_are_replaced():
    text = (
        "Hi, I'm Anna Müller, reach me at anna.mueller@example.de or +49 30 1234 5678. "
        "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, from 192.168.1.20."
    )
    out = redact(text, names=["Anna Müller"], emails=["anna.mueller@example.de"])
    for secret in ("Anna", "Müller", "anna.mueller", "1234 5678", "4111", "DE89", "192.168"):
        assert secret not in out, out
    for placeholder in ("[NAME]", "[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]"):
        assert placeholder in out, out


def test_order_numbers_dates_and_amounts_stay():
    text = "Order #A-99812 placed 2026-11-02 for 129.99 EUR has not arrived (tracking 1Z999AA1)."
    assert redact(text) == text


def test_numbers_that_fail_luhn_are_not_cards():
    assert "[CARD]" not in redact("Invoice 1234 5678 9012 3456 is wrong")


def test_one_redactor_serves_subject_and_body_with_whole_words_only():
    redactor = Redactor(names=["Ann Lee-Smith"], emails=["ann@shop.example"])
    subject = redactor("Ann Lee-Smith: Annual plan")
    body = redactor("ANN here (ann@shop.example). lee-smith is my surname; Annual billing.")
    assert subject == "[NAME]: Annual plan"
    assert body == "[NAME] here ([EMAIL]). [NAME] is my surname; Annual billing."


def test_no_personal_data_given_only_generic_patterns_apply():
    assert Redactor()("Write to x@y.example") == "Write to [EMAIL]"


def test_the_digits_of_a_requester_name_are_not_a_name():
    # Helpdesks fill the name from a store or team label ("Store 4417"); its number is the
    # order or store the ticket is about, not personal data.
    redactor = Redactor(names=["Store 4417", "4417"])
    assert redactor("Store 4417 says order 4417 never arrived") == (
        "[NAME] says order 4417 never arrived"
    )


def test_an_apostrophe_in_the_local_part_is_redacted_with_the_whole_address():
    out = redact("Reply to o'brien@example.ie or o\u2019neill@example.ie, or 'ann@example.ie'")
    assert out == "Reply to [EMAIL] or [EMAIL], or '[EMAIL]'"


def test_an_iban_in_lower_or_mixed_case_is_redacted_but_words_of_its_shape_are_not():
    text = "IBAN de89370400440532013000, or De89 3704 0044 0532 0130 00 for refunds"
    assert redact(text) == "IBAN [IBAN], or [IBAN] for refunds"
    # Country code, two digits and groups of four, but no valid IBAN: ordinary words.
    assert redact("error ab12 when save this form") == "error ab12 when save this form"


def test_an_email_and_a_token_in_a_link_are_redacted_and_its_other_parameters_stay():
    text = (
        "https://app.example.com/reset?token=9f8e7d6c5b4a&email=jo%40x.com "
        "https://shop.example/o?order=A-99812&u=ann%2Bshop%2540x.example&X-Amz-Signature=ab12cd"
    )
    assert redact(text) == (
        "https://app.example.com/reset?token=[SECRET]&email=[EMAIL] "
        "https://shop.example/o?order=A-99812&u=[EMAIL]&X-Amz-Signature=[SECRET]"
    )


def test_a_name_is_redacted_whether_text_or_name_has_composed_or_decomposed_accents():
    nfc, nfd = "Jos\u00e9 Garc\u00eda", "Jose\u0301 Garci\u0301a"
    assert redact(f"Hola, soy {nfd}", names=[nfc]) == "Hola, soy [NAME]"
    assert redact(f"Hola, soy {nfc}", names=[nfd]) == "Hola, soy [NAME]"
    assert redact(f"Soy {nfd}: jose\u0301@example.es", emails=["jos\u00e9@example.es"]) == (
        "Soy Jos\u00e9 Garc\u00eda: [EMAIL]"
    )


def test_a_name_matches_as_casefold_does_so_capitals_with_ss_hide_a_sharp_s():
    # re.IGNORECASE does not fold ß to ss; casefold() does. The ß in "Grüße" and "Straße"
    # makes the folded text longer, so what is replaced must be found again in the original.
    assert redact("Grüße, REGARDS, JÖRG WEISS", names=["Jörg Weiß"]) == "Grüße, REGARDS, [NAME]"
    assert redact("Grüße aus der Straße, Jörg Weiß. Weiß.", names=["JORG WEISS", "Weiss"]) == (
        "Grüße aus der Straße, Jörg [NAME]. [NAME]."
    )


def test_codes_and_session_ids_in_links_are_redacted_but_look_alike_names_are_not():
    text = (
        "https://id.example/verify?code=493021&user=88 "
        "https://app.example/cb?state=xyz&auth_code=abc#access_token=t0k "
        "https://shop.example/cart;jsessionid=0AB1C2?PHPSESSID=9z&sid=s1&apikey=k1 "
        "https://zoo.example/?monkey=3&barcode=5012345678900&sessions=4"
    )
    assert redact(text) == (
        "https://id.example/verify?code=[SECRET]&user=88 "
        "https://app.example/cb?state=xyz&auth_code=[SECRET]#access_token=[SECRET] "
        "https://shop.example/cart;jsessionid=[SECRET]?PHPSESSID=[SECRET]&sid=[SECRET]"
        "&apikey=[SECRET] "
        "https://zoo.example/?monkey=3&barcode=5012345678900&sessions=4"
    )


def test_dates_in_day_or_month_first_order_are_not_phone_numbers():
    # "charged twice on 24.11.2026" is when it happened; it has no phone in it.
    text = "Charged twice on 24.11.2026, again 24/11/2026, 11/24/2026 and 24-11-2026."
    assert redact(text) == text
    assert redact("Call +49 30 1234 5678 or 030 1234567") == "Call [PHONE] or [PHONE]"


def test_references_glued_to_letters_stay():
    text = "Invoice INV-2026-000123 and order ORD-123-4567 (ref AB-2026-11-000042) are wrong"
    assert redact(text) == text


def test_amounts_with_decimals_or_a_currency_sign_are_not_phone_numbers():
    # The size of a wrong charge decides the priority; a phone number has neither.
    text = "You took 1.234.567,89 EUR, then 1 234 567,89 EUR, then €1.234.567 and $1 234 567."
    assert redact(text) == text
    assert redact("Ruf an: 030 1234 5678, danke") == "Ruf an: [PHONE], danke"


def test_pasted_authorization_values_and_jwts_are_secrets():
    jwt = (
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    )
    text = (
        f"curl -H 'Authorization: Bearer {jwt}' fails, so does Basic dXNlcjpwYXNzd29yZDEyMw== "
        f"and the session {jwt} in our logs"
    )
    assert redact(text) == (
        "curl -H 'Authorization: Bearer [SECRET]' fails, so does Basic [SECRET] "
        "and the session [SECRET] in our logs"
    )


def test_the_words_bearer_and_basic_in_prose_stay():
    text = "My Bearer authentication fails since the Basic subscriptions upgrade"
    assert redact(text) == text


def test_a_name_that_is_also_a_word_stays_where_it_is_written_as_a_word():
    redactor = Redactor(names=["Bill Price"])
    out = redactor("My bill doubled and the price is wrong. Bill Price (anna: PRICE, Bill)")
    assert out == "My bill doubled and the price is wrong. [NAME] (anna: [NAME], [NAME])"
    assert redactor("bill price here") == "[NAME] here"


def test_a_mobile_number_typed_as_one_run_of_digits_after_a_phone_word_is_a_phone():
    cases = {
        "mi número de móvil es 612345678": "mi número de móvil es [PHONE]",
        "Mein Handy: 01701234567": "Mein Handy: [PHONE]",
        "call me on 9876543210 tomorrow": "call me on [PHONE] tomorrow",
        "WhatsApp 13800138000": "WhatsApp [PHONE]",
        "numer telefonu 601234567": "numer telefonu [PHONE]",
        "cep telefonum 05321234567": "cep telefonum [PHONE]",
    }
    for text, expected in cases.items():
        assert redact(text) == expected
    # Without a phone word, or with the order named between, the digits are an order.
    for text in ("order number 612345678", "my phone order 123456789 failed"):
        assert redact(text) == text


def test_a_link_s_error_promo_or_country_code_is_no_secret():
    text = (
        "https://shop.example/checkout?promo_code=SAVE10&error_code=E4012&status_code=503"
        "&country_code=DE&currency_code=EUR&sort_key=price says invalid"
    )
    assert redact(text) == text
    assert redact("https://id.example/v?verification_code=493021&product_key=AB-12") == (
        "https://id.example/v?verification_code=[SECRET]&product_key=[SECRET]"
    )


def test_a_luhn_valid_order_number_that_cannot_be_a_card_stays():
    # One long number in ten passes Luhn by chance; no card number starts 0, 1, 7, 8 or 9.
    text = "Orders 9000123456789016, 1000000000000123 and 8000001234568 are missing"
    assert redact(text) == text
    cards = "Visa 4111 1111 1111 1111, MC 5555555555554444, 2223003122003222, Amex 378282246310005"
    assert redact(cards) == "Visa [CARD], MC [CARD], [CARD], Amex [CARD]"


def test_a_token_in_a_reset_or_login_link_s_path_is_a_secret():
    text = (
        "https://app.example/reset-password/9f86d081884c7d659a2feaa0c55ad015 expired, and "
        "https://shop.example/accounts/reset/MQ/c2zk3p-8f1d0e2b7a9c4d6e/ and "
        "https://app.example/magic-link/abcDEF123ghiJKL456 too"
    )
    assert redact(text) == (
        "https://app.example/reset-password/[SECRET] expired, and "
        "https://shop.example/accounts/reset/MQ/[SECRET]/ and "
        "https://app.example/magic-link/[SECRET] too"
    )
    # Order pages and slugs carry no credential.
    kept = (
        "https://shop.example/orders/A-99812/confirm and "
        "https://docs.example/verify/how-to-verify-your-domain-step-2"
    )
    assert redact(kept) == kept


def test_a_four_part_version_number_is_not_an_ip_address():
    text = "App version 2.14.0.3 crashes, firmware: 4.1.0.12 too, and 300.1.2.3 is no address"
    assert redact(text) == text
    assert (
        redact("Blocked from 192.168.1.20, version 1.2.3.4") == "Blocked from [IP], version 1.2.3.4"
    )


def test_a_dotted_build_number_is_not_a_phone_number():
    text = "Chrome 120.0.6099.109 on Windows 10.0.19045.3693, app version 12.34.5678, fails"
    assert redact(text) == text
    assert redact("call 555.123.4567") == "call [PHONE]"


def test_a_french_phone_written_with_dots_is_a_phone_not_an_ip_address():
    # Its first four groups have an address's shape; the last one was left behind.
    assert redact("tel 06.12.34.56.78, server 10.0.0.1") == "tel [PHONE], server [IP]"


def test_a_shouted_sentence_of_an_iban_s_shape_is_not_an_iban():
    text = "MY ORDER AB12 WHEN WILL THIS SHIP, PS5 PRO: WE25 SALE ITEM NOT SENT"
    assert redact(text) == text
    # In capitals, a number that fails the check is still taken: a typo is still an account.
    assert redact("IBAN GB82 WEST 1234 5698 7654 33") == "IBAN [IBAN]"


def test_a_date_with_its_time_is_not_a_phone_number():
    text = "Charged on 24.11.2026 10:30 and again on 2026-11-24 14:05 UTC"
    assert redact(text) == text


def test_the_requesters_literals_are_found_where_the_alternation_pattern_finds_them():
    """The requester's name and email are found by a scan, not a pattern compiled per
    ticket; it must find exactly what `\\b(?:a|b)\\b` (or `(?:a|b)`) finds, leftmost first and
    the earlier literal first where two start together, across word characters (letters,
    digits, underscore, accented letters) and the separators between them."""
    import random
    import re

    from triage.classify.redact import _literal_spans

    rng = random.Random(20261127)
    alphabet = ["a", "n", "ab", "an", "Ä", "ä", "_", "1", " ", "-", ".", "'", "ß"]
    checked = 0
    for _ in range(4000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        literals = list(
            dict.fromkeys(
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)
            )
        )
        for word in (True, False):
            body = "|".join(re.escape(lit) for lit in literals)
            pattern = rf"\b(?:{body})\b" if word else f"(?:{body})"
            expected = [m.span() for m in re.finditer(pattern, text)]
            assert _literal_spans(text, literals, word=word) == expected, (text, literals, word)
            checked += bool(expected)
    # Most cases found something, so the comparison is not between empty lists.
    assert checked > 2000
