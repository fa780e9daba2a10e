"""What the classifier sees of a ticket: the customer's own words, without quoted replies,
signatures or markup."""

from __future__ import annotations

from triage.classify.textclean import clean_ticket_text


def test_quoted_reply_chain_after_wrote_line_is_dropped():
    body = (
        "The refund still has not arrived.\n\n"
        "On Mon, 18 Nov 2026 at 10:02, Support <support@example.com> wrote:\n"
        "> Thanks for reaching out, we issued the refund.\n"
        "> It takes 5 days."
    )
    assert clean_ticket_text(body) == "The refund still has not arrived."


def test_quote_headers_in_other_languages_are_recognised():
    for header in (
        "El lun, 18 nov 2026 a las 10:02, Soporte <s@example.com> escribió:",
        "Le lun. 18 nov. 2026 à 10:02, Support <s@example.com> a écrit :",
        "Am Mo., 18. Nov. 2026 um 10:02 Uhr schrieb Support <s@example.com>:",
    ):
        assert (
            clean_ticket_text(f"Mi pedido no llega.\n{header}\nold text") == "Mi pedido no llega."
        )


def test_signatures_are_trimmed_in_several_languages():
    cases = {
        "My card was declined.\n\nBest regards,\nAnna Smith\n+1 555 0100": "My card was declined.",
        "No puedo entrar.\n\nSaludos,\nCarlos": "No puedo entrar.",
        "Le colis est abîmé.\nCordialement,\nMarie": "Le colis est abîmé.",
        "Die App stürzt ab.\n\nMit freundlichen Grüßen\nJonas": "Die App stürzt ab.",
        "App crashes on start.\n-- \nJohn | ACME Corp": "App crashes on start.",
    }
    for body, expected in cases.items():
        assert clean_ticket_text(body) == expected


def test_thanks_at_the_top_is_a_greeting_not_a_signature():
    body = "Thanks for the quick reply.\nBut the export still fails with error 500."
    assert clean_ticket_text(body) == body


def test_html_becomes_plain_text_without_scripts_or_quoted_blocks():
    body = (
        "<html><head><style>p{color:red}</style></head><body>"
        "<p>Hello,</p><p>I was charged&nbsp;twice &amp; need help.</p>"
        "<blockquote>Earlier message from support</blockquote>"
        "<script>alert(1)</script></body></html>"
    )
    assert clean_ticket_text(body) == "Hello,\n\nI was charged twice & need help."


def test_text_that_is_all_quote_falls_back_to_the_whole_body():
    body = "> only a quoted line"
    assert clean_ticket_text(body) == "> only a quoted line"


def test_thanks_before_the_request_opens_no_signature():
    # Cut at "Thanks!", the ticket was "Hi team," and was classified as that.
    body = "Hi team,\nThanks!\nI was charged twice for order 1234 and need a refund today."
    assert clean_ticket_text(body) == body
    body = "Hola,\nGracias.\nMe cobraron dos veces el pedido 1234.\nSaludos,\nAna"
    assert clean_ticket_text(body) == "Hola,\nGracias.\nMe cobraron dos veces el pedido 1234."
    assert clean_ticket_text("Hi,\nThanks.\nStill broken?") == "Hi,\nThanks.\nStill broken?"


def test_a_signature_with_title_phone_and_address_is_still_trimmed():
    body = (
        "I was charged twice.\n\nThanks,\nJohn Smith\nSenior Account Manager, Acme Corp\n"
        "+1 555 123 4567\nMusterstrasse 1, 10115 Berlin"
    )
    assert clean_ticket_text(body) == "I was charged twice."


def test_a_closing_opens_a_signature_even_above_a_disclaimer_in_sentences():
    body = (
        "The export fails with error 500.\n\nBest regards,\nJohn Smith\n"
        "This email and any attachments are confidential and meant for the recipient only."
    )
    assert clean_ticket_text(body) == "The export fails with error 500."
