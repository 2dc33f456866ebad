//! RabbitMQ: the work queue between producer and consumers.
//!
//! Topology (every name starts with the configured prefix, `quarry` by default):
//! - `quarry.jobs`: a quorum queue of [`Job`] messages, fed through the default exchange.
//!   Its delivery limit sends a message that keeps crashing consumers to the dead-letter queue.
//! - `quarry.dead` (fanout exchange) → `quarry.jobs.dead`: messages that could not be processed,
//!   each with an `x-quarry-reason` header, kept for people to look at (and requeue).
//! - `quarry.dead` → `quarry.jobs.dead.record`: a copy of every dead letter, for consumers to
//!   record the ones the broker dead-lettered itself (past the delivery limit, so no consumer
//!   did), which would otherwise leave their job without a result.
//! - `quarry.jobs.retry.<delay>ms`: one delay queue per retry tier, each with a fixed TTL, whose
//!   expired messages flow back to `quarry.jobs`. A fixed TTL per queue (rather than per message)
//!   means the message at the head always expires first, so no message waits behind a longer one.
//!   The number of failed attempts travels in the `x-quarry-attempts` header.
//!
//! Every message is persistent and published with publisher confirms: `publish_jobs` returns only
//! once the broker has taken responsibility for all of them.

use anyhow::{Context as _, bail};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::RabbitMqConfig;
use quarry_core::job::Job;

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-quarry-reason";

/// Header counting a job's failed attempts, set by the consumer when it schedules a retry.
pub const ATTEMPTS_HEADER: &str = "x-quarry-attempts";

/// How long a consumer waits before asking an empty work queue again: from the first to the
/// second, doubling while it stays empty.
pub const POLL_PAUSE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(25),
    std::time::Duration::from_millis(500),
);

/// Deliveries of one message before the broker itself dead-letters it (crash-loop backstop).
const DELIVERY_LIMIT: i64 = 10;

/// Earlier attempts of a job that started running and never ended (each time its consumer died:
/// counted from the event log, so jobs a dead consumer merely held are not counted) after which
/// a consumer no longer runs it but records it as an error and dead-letters it: a job that kills
/// its consumers must not take the fleet down with it. Below `DELIVERY_LIMIT`, so the job still
/// gets its result; the broker's limit stays the backstop.
pub const CRASH_LIMIT: u32 = 5;

/// The names of Quarry's exchanges and queues under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
    pub dead_exchange: String,
    pub dead: String,
    /// Copies of the dead letters, consumed to record those the broker made.
    pub dead_to_record: String,
    /// Delay queues, in retry order: (name, delay in milliseconds).
    pub retries: Vec<(String, u64)>,
}

impl Topology {
    pub fn new(prefix: &str, retry_delays_ms: &[u64]) -> Topology {
        Topology {
            jobs: format!("{prefix}.jobs"),
            dead_exchange: format!("{prefix}.dead"),
            dead: format!("{prefix}.jobs.dead"),
            dead_to_record: format!("{prefix}.jobs.dead.record"),
            retries: retry_delays_ms
                .iter()
                .map(|ms| (format!("{prefix}.jobs.retry.{ms}ms"), *ms))
                .collect(),
        }
    }
}

pub struct Broker {
    connection: Connection,
    topology: Topology,
}

impl Broker {
    /// Connects and declares the topology (idempotent: declaring what exists is a no-op).
    pub async fn connect(config: &RabbitMqConfig) -> anyhow::Result<Broker> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: config
                .ca_file
                .as_deref()
                .map(crate::tls::read_ca_file)
                .transpose()?,
        };
        let runtime = lapin::runtime::default_runtime()?;
        let connection = Connection::connect_with_config(
            config.url.expose(),
            ConnectionProperties::default(),
            tls,
            runtime,
        )
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}",
                config.url.redacted_url()
            )
        })?;
        let broker = Broker {
            connection,
            topology: Topology::new(&config.prefix, &config.retry_delays_ms),
        };
        broker.declare_topology().await?;
        Ok(broker)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    async fn declare_topology(&self) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        let t = &self.topology;
        channel
            .exchange_declare(
                t.dead_exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot declare the dead-letter exchange")?;
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), long_string("quorum"));
        for queue in [&t.dead, &t.dead_to_record] {
            channel
                .queue_declare(queue.as_str().into(), durable(), quorum.clone())
                .await
                .with_context(|| format!("cannot declare the dead-letter queue {queue}"))?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    t.dead_exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let mut jobs_args = quorum;
        jobs_args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&t.dead_exchange),
        );
        jobs_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        channel
            .queue_declare(t.jobs.as_str().into(), durable(), jobs_args)
            .await
            .with_context(|| {
                format!(
                    "cannot declare the work queue {} (if it exists with other arguments, \
                     delete it or use another --queue-prefix)",
                    t.jobs
                )
            })?;
        for (queue, delay_ms) in &t.retries {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(*delay_ms as i64),
            );
            // Expired messages go back to the work queue through the default exchange.
            args.insert("x-dead-letter-exchange".into(), long_string(""));
            args.insert("x-dead-letter-routing-key".into(), long_string(&t.jobs));
            channel
                .queue_declare(queue.as_str().into(), durable(), args)
                .await
                .with_context(|| format!("cannot declare the delay queue {queue}"))?;
        }
        channel.close(200, "topology declared".into()).await.ok();
        Ok(())
    }

    /// A channel in confirm mode for publishing.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Publisher {
            channel,
            topology: self.topology.clone(),
        })
    }

    /// A channel taking jobs off the work queue one at a time (`basic.get`), and the stream of
    /// what it takes: a job is asked for only when the stream is polled, so a consumer takes
    /// exactly as many as it has room for, and the broker never holds a delivery for it that it
    /// has no room to start (RabbitMQ's `consumer_timeout` would close the channel over it).
    /// While the queue is empty the stream asks again after a pause that grows from
    /// `POLL_PAUSE.0` to `POLL_PAUSE.1`. It ends with the first error (the channel is gone).
    /// Each delivery comes with the number of jobs the queue held after it was taken.
    pub async fn take_jobs(
        &self,
    ) -> anyhow::Result<(
        Channel,
        impl futures::Stream<Item = Result<(lapin::message::Delivery, u32), lapin::Error>> + use<>,
    )> {
        let channel = self.connection.create_channel().await?;
        let queue = self.topology.jobs.clone();
        let taking = channel.clone();
        let jobs = futures::stream::unfold(Some(POLL_PAUSE.0), move |pause| {
            let (channel, queue) = (taking.clone(), queue.clone());
            async move {
                let mut pause = pause?;
                loop {
                    match channel
                        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                        .await
                    {
                        Ok(Some(message)) => {
                            let left = message.message_count;
                            return Some((Ok((message.delivery, left)), Some(POLL_PAUSE.0)));
                        }
                        Ok(None) => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(POLL_PAUSE.1);
                        }
                        Err(err) => return Some((Err(err), None)),
                    }
                }
            }
        });
        Ok((channel, jobs))
    }

    /// Starts consuming the copies of the dead letters, one at a time.
    pub async fn consume_dead_letters(
        &self,
        consumer_tag: &str,
    ) -> anyhow::Result<(Channel, lapin::Consumer)> {
        self.consume_queue(&self.topology.dead_to_record, 1, consumer_tag)
            .await
    }

    async fn consume_queue(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> anyhow::Result<(Channel, lapin::Consumer)> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot start consuming {queue}"))?;
        Ok((channel, consumer))
    }

    /// Messages ready in a queue (not counting those delivered and not yet acked).
    pub async fn ready_messages(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(self.queue_status(queue).await?.0)
    }

    /// Messages ready in a queue, and the consumers attached to it.
    pub async fn queue_status(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel.close(200, "inspected".into()).await.ok();
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Removes from the dead-letter queue the messages of the jobs in `jobs` (requeued from
    /// the database, so these copies are spent) and returns how many it removed. Every other
    /// message goes back to the queue untouched. Reads the queue once, one message at a time:
    /// an operator's action, not a hot path.
    pub async fn remove_dead_letters(
        &self,
        jobs: &std::collections::HashSet<quarry_core::job::JobId>,
    ) -> anyhow::Result<u64> {
        let channel = self.connection.create_channel().await?;
        let dead = self.topology.dead.as_str();
        let (ready, _) = self.queue_status(dead).await?;
        let mut removed = 0;
        let mut kept = Vec::new();
        for _ in 0..ready {
            let Some(message) = channel
                .basic_get(dead.into(), BasicGetOptions { no_ack: false })
                .await
                .context("cannot read the dead-letter queue")?
            else {
                break;
            };
            let delivery = message.delivery;
            match Job::from_message(&delivery.data) {
                Ok(job) if jobs.contains(&job.id) => {
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    removed += 1;
                }
                // Held (unacked) until the end, so the loop does not read it again.
                _ => kept.push(delivery),
            }
        }
        for delivery in kept {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
        }
        channel.close(200, "dead letters read".into()).await.ok();
        Ok(removed)
    }

    pub async fn close(&self) {
        self.connection.close(200, "bye".into()).await.ok();
    }
}

pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    /// Whether its channel is still open (the broker closes a channel on some errors).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the publishing channel (before its connection is closed).
    pub async fn close(&self) {
        self.channel.close(200, "done publishing".into()).await.ok();
    }

    /// Publishes persistent job messages and waits for the broker to confirm every one of them.
    pub async fn publish_jobs<'a>(
        &self,
        jobs: impl IntoIterator<Item = &'a Job>,
    ) -> anyhow::Result<()> {
        let mut confirms = Vec::new();
        // One trace per job, started here when traces are exported; its spans end once the
        // page is confirmed.
        let mut spans = Vec::new();
        for job in jobs {
            let mut properties = persistent().with_message_id(job.id.to_string().into());
            if crate::telemetry::tracing_enabled() {
                let span = tracing::info_span!(
                    parent: None,
                    "publish job",
                    job = %job.id,
                    package = %job.package,
                    toolchain = %job.toolchain,
                );
                let mut headers = FieldTable::default();
                crate::telemetry::inject(&span, &mut headers);
                properties = properties.with_headers(headers);
                spans.push(span);
            }
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.topology.jobs.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &job.to_message(),
                    properties,
                )
                .await
                .context("cannot publish a job")?;
            confirms.push(confirm);
        }
        for confirm in futures::future::join_all(confirms).await {
            let confirmation = confirm.context("lost the broker's confirmation")?;
            if !confirmation.is_ack() {
                bail!("the broker refused a job message (nack)");
            }
            if confirmation.take_message().is_some() {
                bail!("a job message was returned as unroutable: is the work queue missing?");
            }
        }
        Ok(())
    }

    /// Whether a job may be retried after its `failed_attempts`-th failure: a delay queue is left.
    pub fn retries_left(&self, failed_attempts: u32) -> bool {
        (failed_attempts.saturating_sub(1) as usize) < self.topology.retries.len()
    }

    /// Whether a job can be put aside to wait (there is a delay queue).
    pub fn can_defer(&self) -> bool {
        !self.topology.retries.is_empty()
    }

    /// Schedules another attempt of a job after its `failed_attempts`-th failure, through the
    /// matching delay queue (`retries_left` says whether there is one).
    pub async fn retry_later(&self, body: &[u8], failed_attempts: u32) -> anyhow::Result<()> {
        let tier = failed_attempts.saturating_sub(1) as usize;
        self.delay(body, tier, failed_attempts).await
    }

    /// Puts a job aside for the shortest delay without counting a failed attempt (it waits for
    /// an identical job to finish); `can_defer` says whether it can.
    pub async fn defer(&self, body: &[u8], failed_attempts: u32) -> anyhow::Result<()> {
        self.delay(body, 0, failed_attempts).await
    }

    async fn delay(&self, body: &[u8], tier: usize, failed_attempts: u32) -> anyhow::Result<()> {
        let Some((queue, _)) = self.topology.retries.get(tier) else {
            bail!("no delay queue for retry tier {tier}");
        };
        let mut headers = FieldTable::default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(failed_attempts)),
        );
        self.publish_confirmed("", queue, body, headers, "a delayed job")
            .await
    }

    /// Puts a job back on the work queue as it was (with its count of failed attempts), for any
    /// consumer to take: one handed back, or one whose lease lapsed.
    pub async fn put_back(&self, body: &[u8], failed_attempts: u32) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(failed_attempts)),
        );
        let queue = self.topology.jobs.clone();
        self.publish_confirmed("", &queue, body, headers, "a job put back")
            .await
    }

    /// Moves a message body to the dead-letter queue with the reason it could not be processed.
    pub async fn dead_letter(&self, body: &[u8], reason: &str) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), long_string(reason));
        let exchange = self.topology.dead_exchange.as_str();
        self.publish_confirmed(exchange, "", body, headers, "a dead letter")
            .await
    }

    /// Publishes one persistent message and waits for the broker to confirm it.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        mut headers: FieldTable,
        what: &str,
    ) -> anyhow::Result<()> {
        // A job put back (a retry, a wait) or aside (a dead letter) stays in its trace.
        crate::telemetry::inject(&tracing::Span::current(), &mut headers);
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                persistent().with_headers(headers),
            )
            .await?
            .await
            .with_context(|| format!("lost the broker's confirmation for {what}"))?;
        if !confirmation.is_ack() {
            bail!("the broker refused {what} (nack)");
        }
        Ok(())
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// How many attempts of this job already failed (0 for a first delivery).
pub fn failed_attempts(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get(ATTEMPTS_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// How often the broker delivered this message before (quorum queues count it in
/// `x-delivery-count`: deliveries that ended without an ack).
pub fn previous_deliveries(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// Why the broker itself dead-lettered a message, from its `x-death` header (`delivery_limit`,
/// `rejected`, `expired`, `maxlen`), with how often; `None` if it did not.
pub fn broker_death(properties: &BasicProperties) -> Option<(String, i64)> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    // The most recent death comes first.
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    let reason = match death.inner().get("reason")? {
        AMQPValue::LongString(reason) => reason.to_string(),
        _ => return None,
    };
    let count = match death.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        _ => 1,
    };
    Some((reason, count))
}

/// The reason header of a dead-lettered message, if it has one.
pub fn dead_letter_reason(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(REASON_HEADER)? {
        AMQPValue::LongString(reason) => Some(reason.to_string()),
        _ => None,
    }
}
